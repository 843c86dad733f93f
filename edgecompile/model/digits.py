"""The bundled default model's data and judge: scikit-learn's 8x8 handwritten digits (offline, 1,797 images).

Images become 1-channel 8x8 'latents' in [-1, 1]; the class label becomes the conditioning token sequence.
A classifier trained on the real digits judges generated samples (accuracy = sample classified as its prompt).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from edgecompile.model.sampling import euler_sample

N_CLASSES = 10


def digits_dataset(size: tuple[int, int] = (8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, H, W) in [-1, 1], labels (N,)): the 8x8 digits, bilinearly upsampled to a larger `size`."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    if tuple(size) != (8, 8):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


def train_classifier(seed: int = 0) -> SVC:
    """RBF SVM on the real digits (about 99% cross-validated accuracy on this data)."""
    x, y = digits_dataset()
    return SVC(gamma="scale", C=10.0, random_state=seed).fit(x.reshape(len(x), -1).numpy(), y.numpy())


def classify(clf: SVC, samples: torch.Tensor) -> np.ndarray:
    """The digit each sample shows; a sample larger than 8x8 (a 16x16 latent) is area-averaged to 8x8 first."""
    if tuple(samples.shape[-2:]) != (8, 8):
        samples = torch.nn.functional.adaptive_avg_pool2d(samples.float(), (8, 8))
    return clf.predict(samples.clamp(-1, 1).reshape(len(samples), -1).numpy())


def class_prompts(prompts, per_class: int) -> tuple[torch.Tensor, np.ndarray]:
    """Conditioning tokens for `per_class` samples of every class, and the class each one asks for."""
    labels = np.repeat(np.arange(N_CLASSES), per_class)
    return prompts.tokens[torch.from_numpy(labels)], labels


def sample_accuracy(denoiser, prompts, clf: SVC, per_class: int = 20, steps: int = 20, cfg_scale: float = 2.0,
                    seed: int = 0, latent_hw: tuple[int, int] = (8, 8)) -> tuple[float, torch.Tensor]:
    """Generate per_class samples of each digit with fixed noise at `latent_hw`; return (accuracy, samples)."""
    text, labels = class_prompts(prompts, per_class)
    noise = torch.randn((len(labels), 1, *latent_hw), generator=torch.Generator().manual_seed(seed))
    samples = euler_sample(denoiser, noise, text, steps=steps, cfg_scale=cfg_scale, null_text=prompts.null)
    return float((classify(clf, samples) == labels).mean()), samples

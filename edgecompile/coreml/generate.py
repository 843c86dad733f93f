"""Sampling through a package, as an app runs it: the scheduler loop of model/sampling.py (Euler for flow models,
DDIM for epsilon models) with the package as the denoiser (Core ML on macOS, the MIL interpreter elsewhere),
beside the checkpoint's own samples from the same noise.

The final-sample PSNR measures how far the package's pictures drift from the checkpoint's over the whole loop
(guidance and every step included), which three single denoiser calls do not show. For the bundled digits model
a classifier trained on the real digits also scores what the package draws.
"""

from __future__ import annotations

import math
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from edgecompile.coreml.package import PackageView, load_chain
from edgecompile.coreml.verify import GenerationSummary, package_feeds, package_runner, run_chain
from edgecompile.deploy.contract import OUTPUT, text_to_package
from edgecompile.errors import EdgeCompileError
from edgecompile.metrics import psnr_db
from edgecompile.model.config import width_label
from edgecompile.model.checkpoint import Checkpoint, Prompts
from edgecompile.model.elastic import extract_width
from edgecompile.model.sampling import sample

DIGITS_DATA = "sklearn.datasets.load_digits"  # the bundled model's provenance names its data: its samples can be scored


@dataclass(frozen=True)
class SampleSettings:
    """The app's loop: steps, classifier-free guidance scale, the noise seed, and samples per prompt."""

    steps: int = 4
    cfg_scale: float = 2.0
    seed: int = 0
    per_prompt: int = 1

    # Bounds stated up front rather than found by running out of time or memory: the package runs once per step
    # (twice with guidance) for every sample, and a DDPM schedule has no more than its 1000 training timesteps.
    MAX_STEPS: ClassVar[int] = 1000
    MAX_SAMPLES: ClassVar[int] = 1024  # samples in one grid (prompts x per prompt)
    MAX_SEED: ClassVar[int] = 2**63 - 1  # torch.Generator takes a signed 64-bit seed

    def validate(self, prompts: int = 1) -> None:
        if not 1 <= self.steps <= self.MAX_STEPS:
            raise EdgeCompileError(f"--steps {self.steps} must be in 1..{self.MAX_STEPS} (4 is what the app runs)")
        if not 0 <= self.seed <= self.MAX_SEED:
            raise EdgeCompileError(f"--seed {self.seed} must be in 0..{self.MAX_SEED}")
        if not 1 <= self.per_prompt or prompts * self.per_prompt > self.MAX_SAMPLES:
            raise EdgeCompileError(f"{prompts} prompt(s) x --per-prompt {self.per_prompt} samples is more than the {self.MAX_SAMPLES} one grid "
                                   "holds: pick fewer prompts (--prompt) or a smaller --per-prompt")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0):
            raise EdgeCompileError(f"--cfg {self.cfg_scale} must be a finite number >= 1 (1 turns guidance off)")
        if self.per_prompt < 1:
            raise EdgeCompileError(f"--per-prompt {self.per_prompt} must be >= 1")


@dataclass
class GenerationResult:
    package: str
    runtime: str
    settings: SampleSettings
    labels: list[str]  # the prompt label of each sample
    package_samples: np.ndarray  # (N, C, H, W): what the app draws
    checkpoint_samples: np.ndarray | None  # the fp32 checkpoint at the package's width, from the same noise
    seconds: float
    package_accuracy: float | None = None
    checkpoint_accuracy: float | None = None

    @property
    def per_sample_psnr_db(self) -> list[float]:
        if self.checkpoint_samples is None:
            return []
        return [psnr_db(w, g) for w, g in zip(self.checkpoint_samples, self.package_samples)]

    def summary(self, grid: str | None = None) -> GenerationSummary:
        s = self.settings
        return GenerationSummary(
            runtime=self.runtime, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed, labels=self.labels,
            psnr_db=None if self.checkpoint_samples is None else psnr_db(self.checkpoint_samples, self.package_samples),
            worst_sample_psnr_db=min(self.per_sample_psnr_db, default=None), package_accuracy=self.package_accuracy,
            checkpoint_accuracy=self.checkpoint_accuracy,
            non_finite_samples=int(sum(not np.isfinite(x).all() for x in self.package_samples)), seconds=round(self.seconds, 2), grid=grid)

    def grid_rows(self) -> list[tuple[str, np.ndarray]]:
        rows = [("package", self.package_samples)]
        if self.checkpoint_samples is not None:
            rows.append(("checkpoint", self.checkpoint_samples))
        return rows


class PackageDenoiser:
    """(x_t, t, text (B, T, D)) -> the package's output, as the samplers call a denoiser. Packages have a static
    batch of 1, so a batch runs one item at a time; a chunk runs with its whole chain."""

    def __init__(self, view: PackageView, precision: str = "auto", runtime: str = "auto"):
        if precision == "auto":  # what the device computes: Core ML where it runs, else the interpreter in fp16
            coreml = sys.platform == "darwin" and runtime != "interpreter"
            precision = "fp32" if coreml or view.is_onnx or view.is_aimodel else "fp16"  # Core ML, onnxruntime, Core AI compute as they do
        self.views = load_chain(view)
        runners, labels = zip(*(package_runner(v, precision, runtime) for v in self.views))
        self.runners = list(runners)
        self.label = labels[0] + (f", a chain of {len(self.views)} chunks" if len(self.views) > 1 else "")
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`text_mask` (B, T) for packages with a mask input; without one, every token is attended (prompt embeddings
        carry no mask), which is what the reference sampler computes too."""
        outs = []
        masked = bool(self.views[0].meta and self.views[0].meta.config.get("text_mask"))
        for i in range(x.shape[0]):
            mask = (text_mask[i : i + 1].float().cpu() if text_mask is not None else torch.ones(1, text.shape[1])) if masked else None
            feeds = package_feeds(x[i : i + 1].float().cpu(), t[i : i + 1].float().cpu(), text_to_package(text[i : i + 1].float().cpu()), mask)
            outs.append(torch.from_numpy(run_chain(self.views, self.runners, feeds)[OUTPUT]))
            self.calls += 1
        return torch.cat(outs).to(x.device)


def select_prompts(prompts: Prompts | None, labels: list[str] | None, source: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(tokens (N, T, D), null (1, T, D), labels) of the prompts asked for by label (all of them by default)."""
    if prompts is None:
        raise EdgeCompileError(f"{source} ships no prompts: pass your own text embeddings with --prompts FILE "
                               "(safetensors: 'tokens' (N, T, D) and 'null', the empty prompt's embedding)")
    if not labels:
        return prompts.tokens, prompts.null, list(prompts.labels)
    unknown = [label for label in labels if label not in prompts.labels]
    if unknown:
        raise EdgeCompileError(f"--prompt {unknown[0]!r} is not one of the prompts of {source} ({', '.join(prompts.labels)})")
    idx = torch.tensor([prompts.labels.index(label) for label in labels])
    return prompts.tokens[idx], prompts.null, list(labels)


def is_digits_model(ckpt: Checkpoint) -> bool:
    return ckpt.provenance.get("data") == DIGITS_DATA and ckpt.config.latent_channels == 1


def generate(view: PackageView, ckpt: Checkpoint, prompts: Prompts, labels: list[str] | None = None,
             settings: SampleSettings | None = None, compare: bool = True, precision: str = "auto", runtime: str = "auto",
             device: torch.device | str = "cpu", progress: Callable[[str, int, int], None] | None = None) -> GenerationResult:
    """Sample `settings.per_prompt` pictures per prompt through the package and, with `compare`, through the
    checkpoint at the package's width from the same noise (the checkpoint's own sampler: Euler or DDIM)."""
    settings = settings or SampleSettings()
    settings.validate()
    view.require_meta("sample")
    tokens, null, names = select_prompts(prompts, labels, str(ckpt.path or "the checkpoint"))
    tokens, names = tokens.repeat_interleave(settings.per_prompt, 0), [n for n in names for _ in range(settings.per_prompt)]
    config = ckpt.config
    noise = torch.randn((len(names), config.latent_channels, *view.latent_hw), generator=torch.Generator().manual_seed(settings.seed))
    start = time.perf_counter()
    denoiser = PackageDenoiser(view, precision, runtime)
    calls = len(names) * settings.steps * (2 if settings.cfg_scale != 1.0 else 1)

    def counted(x, t, text):
        out = denoiser(x, t, text)
        if progress:
            progress(f"sampling through the package ({denoiser.label})", denoiser.calls, calls)
        return out

    got = sample(config, counted, noise, tokens, settings.steps, settings.cfg_scale, null).numpy()
    want = None
    if compare:
        reference = extract_width(ckpt.model, view.width, share=True).to(device).eval()
        with torch.no_grad():
            want = sample(config, lambda x, t, c: reference(x, t, c), noise.to(device), tokens.to(device), settings.steps,
                          settings.cfg_scale, null.to(device)).cpu().numpy()
    result = GenerationResult(package=str(view.path), runtime=denoiser.label, settings=settings, labels=names, package_samples=got,
                              checkpoint_samples=want, seconds=time.perf_counter() - start)
    if is_digits_model(ckpt) and all(n.isdigit() for n in names):
        from edgecompile.model.digits import classify, train_classifier

        clf, asked = train_classifier(), np.array([int(n) for n in names])

        def accuracy(samples: np.ndarray) -> float:
            finite = np.isfinite(samples).reshape(len(samples), -1).all(axis=1)  # a NaN sample is a wrong one
            right = np.zeros(len(samples), dtype=bool)
            if finite.any():
                right[finite] = classify(clf, torch.from_numpy(samples[finite])) == asked[finite]
            return float(right.mean())

        result.package_accuracy = accuracy(got)
        if want is not None:
            result.checkpoint_accuracy = accuracy(want)
    return result


def picture(latent: np.ndarray) -> tuple[np.ndarray, str | None]:
    """One sample as an image in [0, 1]: a 1-channel latent is the picture itself (the digits model); a latent of a
    VAE shows its first three channels, normalised (no decoder runs here)."""
    if latent.shape[0] == 1:
        return np.clip((latent[0] + 1) / 2, 0, 1), "gray"
    rgb = latent[:3].transpose(1, 2, 0)
    lo, hi = np.percentile(rgb, 1), np.percentile(rgb, 99)
    return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1), None


def grid_title(result: GenerationResult, view: PackageView) -> str:
    s = result.settings
    bits = view.bits.value
    summary = result.summary()
    title = (f"{Path(result.package).name}: width {width_label(view.width)}, {'fp16' if bits == '16' else bits + '-bit'}, "
             f"{s.steps} steps, CFG {s.cfg_scale:g}, seed {s.seed}")
    if summary.psnr_db is not None:
        title += f"; package vs checkpoint {summary.psnr_db:.1f} dB"
    if summary.package_accuracy is not None:
        title += f"; digits classified right: {summary.package_accuracy:.0%}"
    return title


def save_grid(rows: list[tuple[str, np.ndarray]], labels: list[str], path: Path, title: str) -> None:
    """A labelled PNG grid: one row per source (package, checkpoint), one column per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    width_in = max(4.0, 1.1 * n)
    # the title wrapped to the figure's width (about 12 characters an inch at 9 pt), never clipped
    title_lines = textwrap.wrap(title, width=int(width_in * 12)) or [""]
    fig, axes = plt.subplots(len(rows), n, figsize=(width_in, 1.3 * len(rows) + 0.25 + 0.18 * len(title_lines)), squeeze=False)
    for r, (name, samples) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            image, cmap = picture(samples[c])
            ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("\n".join(title_lines), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)

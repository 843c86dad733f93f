"""The VAE decoder (diffusers `AutoencoderKL`, `AutoencoderTiny`) as a package graph, and the encoder for
image-to-image. The latent scaling and shift are inside the package, so the app feeds the denoiser's final latent
as it is:

    decoder  z (1, C, h, w) float32, the denoiser's latent  ->  image (1, 3, 8h, 8w) float32 in [-1, 1]
    encoder  image (1, 3, H, W) float32 in [-1, 1]  ->  z (1, C, H/8, W/8), scaled as the denoiser takes it (the mean)

Names follow apple/ml-stable-diffusion's VAEDecoder / VAEEncoder (z, image). A VAE is a convolution network in
(B, C, H, W) already: its layout is the Neural Engine's, so no rewrite is needed; what fp16 needs (the SDXL
decoder overflows it in its group norms) is found and kept in fp32 at conversion (coreml/component.py).
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompile.errors import EdgeCompileError

Z = "z"
IMAGE = "image"
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def latent_scale_shift(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE's config: the denoiser works on (x - shift) * scale."""
    c = vae.config
    scale = getattr(c, "scaling_factor", None)
    shift = getattr(c, "shift_factor", None)
    return float(scale if scale is not None else 1.0), float(shift if shift is not None else 0.0)


class VAEDecoderGraph(nn.Module):
    """z -> image: undo the latent scaling and shift, then decode (diffusers' `vae.decode(z / scale + shift)`)."""

    input_names = (Z,)
    output_names = (IMAGE,)

    def __init__(self, vae, latent_hw: tuple[int, int]):
        super().__init__()
        name = type(vae).__name__
        if name not in VAE_CLASSES:
            raise EdgeCompileError(f"VAE class {name} is not supported: edgecompile compiles {' and '.join(VAE_CLASSES)}")
        self.vae = vae.eval()
        self.latent_hw = tuple(latent_hw)
        self.scale, self.shift = latent_scale_shift(vae)
        self.channels = int(vae.config.latent_channels)

    def example(self) -> tuple[torch.Tensor]:
        return (torch.zeros(1, self.channels, *self.latent_hw),)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale + self.shift).sample  # (1, 3, 8h, 8w) in [-1, 1]


class VAEEncoderGraph(nn.Module):
    """image -> z: encode, take the posterior's mean (deterministic), apply the latent scaling and shift."""

    input_names = (IMAGE,)
    output_names = (Z,)

    def __init__(self, vae, image_hw: tuple[int, int]):
        super().__init__()
        name = type(vae).__name__
        if name not in VAE_CLASSES:
            raise EdgeCompileError(f"VAE class {name} is not supported: edgecompile compiles {' and '.join(VAE_CLASSES)}")
        self.vae = vae.eval()
        self.image_hw = tuple(image_hw)
        self.scale, self.shift = latent_scale_shift(vae)

    def example(self) -> tuple[torch.Tensor]:
        return (torch.zeros(1, 3, *self.image_hw),)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(image)
        latent = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return (latent - self.shift) * self.scale

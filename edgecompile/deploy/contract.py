"""The package's I/O contract: the names, shapes and meaning of a deploy graph's inputs and output, the text
layout it takes, and the metadata every exported model carries (Core ML user metadata, ONNX metadata_props).

I/O names follow apple/ml-stable-diffusion's SD3 denoiser (MultiModalDiffusionTransformer) where the meaning
matches, so Swift pipelines can bind them: all Float32 at the boundary (Swift feeds Float32 MLMultiArrays).
"""

from __future__ import annotations

import torch

from edgecompile.choices import Bits
from edgecompile.deploy.metadata import PackageMetadata

LATENT = "latent_image_embeddings"  # (B, C, H, W)
TIMESTEP = "timestep"  # (B,): flow time t in [0, 1] (1 = pure noise), or DDPM steps for epsilon models
TEXT = "token_level_text_embeddings"  # (B, text_dim, 1, T)
OUTPUT = "denoiser_output"  # (B, C, H, W): velocity v = eps - x0, or the noise eps
TEXT_MASK = "text_attention_mask"  # (B, T): 1 for a token, 0 for padding (configs with text_mask)


def input_names(config) -> list[str]:
    """The denoiser package's inputs, in the order the graph takes them."""
    return [LATENT, TIMESTEP, TEXT, *([TEXT_MASK] if config.text_mask else [])]


def io_doc(config) -> dict[str, str]:
    """What each input and the output mean, for the config's prediction type (ModelConfig.prediction)."""
    text = "text token embeddings in channel-first layout, (B, text_dim, 1, T) float32"
    if config.caption_projection:
        text += " (the text encoder's raw output: the caption projection runs inside the package)"
    mask = {TEXT_MASK: "text attention mask, (B, T) float32: 1 for a token, 0 for padding (padding gets -10000 added to its "
                       "cross-attention scores, as diffusers' PixArt pipelines do)"} if config.text_mask else {}
    if config.prediction == "epsilon":
        last = config.train_timesteps - 1
        return {**mask,
            LATENT: "noisy latent x_t, (B, C, H, W) float32",
            TIMESTEP: f"DDPM timestep in 0..{last} (the scheduler's own units, {last} = noise), (B,) float32",
            TEXT: text,
            OUTPUT: (f"predicted noise (epsilon), (B, C, H, W) float32 (DDPM, linear betas {config.beta_start:g}..{config.beta_end:g} "
                     f"over {config.train_timesteps} steps): step with DDIM or DPM-Solver"),
        }
    return {
        **mask,
        LATENT: "noisy latent x_t, (B, C, H, W) float32",
        TIMESTEP: "flow time t in [0, 1] (1 = noise), (B,) float32",
        TEXT: text,
        OUTPUT: "predicted velocity v = noise - x0, (B, C, H, W) float32; Euler step x <- x + (t_next - t) * v",
    }


def text_to_package(text_btd: torch.Tensor) -> torch.Tensor:
    """(B, T, D) training layout -> (B, D, 1, T): channels first, tokens on the last axis (ANE principle: the
    channel axis is the one 1x1 convs reduce over)."""
    return text_btd.transpose(1, 2)[:, :, None]  # (B, T, D) -> (B, D, T) -> (B, D, 1, T)


def text_from_package(text: torch.Tensor) -> torch.Tensor:
    """(B, D, 1, T) -> (B, T, D), the inverse of text_to_package."""
    return text[:, :, 0].transpose(1, 2)  # (B, D, 1, T) -> (B, D, T) -> (B, T, D)


def with_btd_text(deploy):
    """The deploy graph as a callable (latent, t, text_btd) taking text in the reference model's layout."""
    return lambda latent, t, text_btd: deploy(latent, t, text_to_package(text_btd))


def example_inputs(deploy, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of the package's shapes (used for tracing and for verification): latent, timestep, text
    and, for configs with text_mask, a mask of all tokens."""
    c = deploy.config
    g = torch.Generator().manual_seed(seed)
    h, w = deploy.latent_hw
    latent = torch.randn((batch, c.latent_channels, h, w), generator=g)
    t = (torch.rand((batch,), generator=g) * 0.9 + 0.05) * c.max_timestep
    text = torch.randn((batch, c.text_dim, 1, c.text_len), generator=g)
    return (latent, t, text, torch.ones(batch, c.text_len)) if c.text_mask else (latent, t, text)


def package_metadata(deploy, width: float, params: int, config: dict, checkpoint_sha256: str | None, bits: Bits | str = Bits.FP16,
                     **more) -> PackageMetadata:
    """The metadata record of a package converted from `deploy` (its latent size and I/O meanings come from the
    graph); `more` sets the record's optional fields (bits_per_layer, sidecar digests, chunk binding, ...)."""
    return PackageMetadata(width=width, params=params, bits=Bits.parse(bits, "--bits"), latent_hw=tuple(deploy.latent_hw), config=config,
                           checkpoint_sha256=checkpoint_sha256, io=io_doc(deploy.config), **more)

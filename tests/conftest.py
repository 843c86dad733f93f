"""Shared fixtures: small configs and checkpoints that convert in seconds on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

from edgecompile.model.checkpoint import save_checkpoint
from edgecompile.model.config import ModelConfig
from edgecompile.model.dit import EfficientDiT, randomize_untrained

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(1)  # test models are tiny: one thread avoids OpenMP spin-waits, which cost most when cores are shared

TINY = ModelConfig(
    name="tiny", hidden_dim=32, head_dim=8, num_heads=8, num_kv_heads=4, text_dim=16, text_len=3,
    depth_down=1, depth_middle=2, depth_up=1, ffn_ratio=2, ffn_ratio_middle=2, widths=(0.5, 1.0), bna_blocks=4,
)

# Configs that exercise every structural option; all small enough for many forward passes.
CONFIGS = {
    "toy": ModelConfig(),
    "toy-sequence-bna": ModelConfig(bna_tiling="sequence"),
    "non-square": ModelConfig(sample_size=(8, 16)),
    "patch2-4ch": ModelConfig(latent_channels=4, patch_size=2, sample_size=(16, 24), bna_blocks=4, bna_tiling="grid"),
    "full-attention": ModelConfig(down_up_attention="full", sample_size=(8, 12)),
    "plain-dit": ModelConfig(stage_downsample=False, depth_down=0, depth_up=0, depth_middle=3),
}


def trained_like(config: ModelConfig, seed: int = 0) -> EfficientDiT:
    """Default init plus small random residual branches: activations of realistic scale."""
    torch.manual_seed(seed)
    return randomize_untrained(EfficientDiT(config), seed, std=0.05).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(trained_like(TINY), path)
    return path


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    """fp16 Core ML packages of both widths of the tiny checkpoint, exported once per session."""
    from edgecompile.export import ExportOptions, run_export
    from edgecompile.model.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("export")
    ckpt = load_checkpoint(tiny_checkpoint)
    reports = run_export(ckpt, ExportOptions(output=out, widths=[0.5, 1.0]))
    return {r.width: r for r in reports}

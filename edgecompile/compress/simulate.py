"""edgecompile's torch simulation of a compressed package: the deploy model of the package's width with the
palettized weights decoded (and the self-distilled parameters loaded), rebuilt from the checkpoint and the
sidecar files saved beside the package (compress/sidecars.py). Packages from before the palettes file are
rebuilt with plain k-means, which is what made them. Verification receives the simulation from its caller
(export, or `verify_exported`)."""

from __future__ import annotations

import torch

from edgecompile.compress.distill import load_trained_state
from edgecompile.compress.palettize_model import apply_palettes, palettize_deploy
from edgecompile.compress.sidecars import read_distilled, read_palettes
from edgecompile.deploy.rewrite import deploy_model


def simulated_model_for_package(view, ckpt, device: torch.device | str = "cpu"):
    """None for an fp16 package (its reference is the checkpoint itself); else the compressed deploy graph on
    `device`, taking the package's inputs.

    `view` is the package read back (coreml.package.PackageView): its path, latent size and metadata record."""
    meta = view.require_meta("verify")
    if not meta.palettized:
        return None
    deploy = deploy_model(ckpt.model, meta.width, latent_hw=view.latent_hw)
    palettes = read_palettes(view.path, meta)
    if palettes is not None:
        apply_palettes(deploy, palettes)
    else:
        palettize_deploy(deploy, meta.bits_per_layer, meta.group_size)
    state = read_distilled(view.path, meta)
    if state is not None:
        load_trained_state(deploy, state)
    return deploy.fuse_attention().to(device)  # a torch-only reference: batched attention, the same sums

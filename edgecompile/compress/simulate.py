"""edgecompile's torch simulation of a compressed package: the deploy model of the package's width with the
palettized weights decoded (and the self-distilled parameters loaded), rebuilt from the checkpoint and the files
saved beside the package: the palettes (LUTs and indices, palettes.safetensors) and the distilled state, each
bound to the package by its sha256. Packages from before the palettes file are rebuilt with plain k-means, which
is what made them. Verification receives the simulation from its caller (export, or `verify_exported`)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from edgecompile.compress.distill import DISTILLED_STATE, load_trained_state
from edgecompile.compress.palettize_model import PALETTES_FILE, apply_palettes, load_palettes, palettize_deploy
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.digest import sha256_file
from edgecompile.errors import EdgeCompileError


def simulated_model_for_package(view, ckpt, device: torch.device | str = "cpu"):
    """None for an fp16 package (its reference is the checkpoint itself); else the compressed deploy graph on
    `device`, taking the package's inputs.

    `view` is the package read back (coreml.package.PackageView): its path, width, latent size and metadata."""
    meta = view.metadata
    if meta.get("edgecompile.bits", "16") == "16":
        return None
    bits = {k: int(v) for k, v in json.loads(meta["edgecompile.bits_per_layer"]).items()}
    group = int(meta.get("edgecompile.group_size", "0")) or None
    deploy = deploy_model(ckpt.model, view.width, latent_hw=view.latent_hw)
    palettes_sha = meta.get("edgecompile.palettes_sha256")
    if palettes_sha:
        path = view.path.parent / PALETTES_FILE
        if not path.is_file() or sha256_file(path) != palettes_sha:
            raise EdgeCompileError(f"package {view.path} is palettized: keep {PALETTES_FILE} from its export folder beside it to verify it")
        palettes = load_palettes(path)
        if {n: p.nbits for n, p in palettes.items()} != {n: b for n, b in bits.items() if b < 16}:
            raise EdgeCompileError(f"{path} does not hold the palettes of the bits recorded in {view.path.name}")
        apply_palettes(deploy, palettes)
    else:
        palettize_deploy(deploy, bits, group)
    want = meta.get("edgecompile.distilled_sha256")
    if want:
        state_path = view.path.parent / DISTILLED_STATE
        if not state_path.is_file() or sha256_file(state_path) != want:
            raise EdgeCompileError(f"package {view.path} was self-distilled: keep {DISTILLED_STATE} from its export folder beside it to verify it")
        load_trained_state(deploy, load_file(str(state_path)))
    return deploy.to(device)

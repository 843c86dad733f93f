"""The files a compressed package's verification needs beside it, written and read here only: the palettes
(LUTs and indices, `palettes.safetensors`) and the self-distilled parameters (`distilled.safetensors`). Each is
bound to its package by a SHA-256 recorded in the package's metadata (PackageMetadata.palettes_sha256,
distilled_sha256), so a sidecar from another export, or an edited one, is refused by name.

An app does not load them: they let `verify` rebuild edgecompile's simulation of the package from the checkpoint.
They lie in the width's folder, beside the package, or one level up from a Swift `Resources/` folder, which holds
what the app bundles and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

from edgecompile.choices import KEEP_FP16
from edgecompile.compress.kmeans import Palette
from edgecompile.deploy.metadata import PackageMetadata
from edgecompile.digest import sha256_file
from edgecompile.errors import EdgeCompileError

PALETTES_FILE = "palettes.safetensors"
DISTILLED_STATE = "distilled.safetensors"
PALETTE_LAYERS = "layers"  # the palettes file's metadata: layer -> {nbits, group_size, shape}
SWIFT_RESOURCES = "Resources"  # the folder an app bundles (coreml/swift.py)


def sidecar_dir(package: Path) -> Path:
    """Where the sidecars of the package at `package` lie: its folder, or the folder above `Resources/`."""
    package = Path(package)
    return package.parent.parent if package.parent.name == SWIFT_RESOURCES else package.parent


@dataclass(frozen=True)
class Sidecars:
    """The digests of what was written; they go into the package's metadata."""

    palettes_sha256: str | None = None
    distilled_sha256: str | None = None


def write_sidecars(folder: Path, palettes: dict[str, Palette] | None, distilled: dict[str, torch.Tensor] | None) -> Sidecars:
    """Write the palettes and the distilled state (each when given) into `folder`; returns their digests."""
    palettes_sha = distilled_sha = None
    if palettes is not None:
        save_palettes(palettes, folder / PALETTES_FILE)
        palettes_sha = sha256_file(folder / PALETTES_FILE)
    if distilled is not None:
        save_torch_file(distilled, str(folder / DISTILLED_STATE))
        distilled_sha = sha256_file(folder / DISTILLED_STATE)
    return Sidecars(palettes_sha256=palettes_sha, distilled_sha256=distilled_sha)


def read_palettes(package: Path, meta: PackageMetadata) -> dict[str, Palette] | None:
    """The package's palettes, checked against its recorded digest and bits; None for packages from before the
    palettes file (rebuilt with plain k-means, which is what made them)."""
    if not meta.palettes_sha256:
        return None
    path = sidecar_dir(package) / PALETTES_FILE
    if not path.is_file() or sha256_file(path) != meta.palettes_sha256:
        raise EdgeCompileError(f"package {package} is palettized: keep {PALETTES_FILE} from its export folder beside it to verify it")
    palettes = load_palettes(path)
    if {n: p.nbits for n, p in palettes.items()} != {n: b for n, b in (meta.bits_per_layer or {}).items() if b < KEEP_FP16}:
        raise EdgeCompileError(f"{path} does not hold the palettes of the bits recorded in {Path(package).name}")
    return palettes


def read_distilled(package: Path, meta: PackageMetadata) -> dict[str, torch.Tensor] | None:
    """The package's self-distilled parameters, checked against its recorded digest; None when it was not distilled."""
    if not meta.distilled_sha256:
        return None
    path = sidecar_dir(package) / DISTILLED_STATE
    if not path.is_file() or sha256_file(path) != meta.distilled_sha256:
        raise EdgeCompileError(f"package {package} was self-distilled: keep {DISTILLED_STATE} from its export folder beside it to verify it")
    return load_torch_file(str(path))


def save_palettes(palettes: dict[str, Palette], path) -> None:
    """LUTs (fp16) and indices (two per byte up to 4 bits) of every palettized layer, as safetensors."""
    tensors, layers = {}, {}
    for name, p in palettes.items():
        flat = p.indices.reshape(-1).astype(np.uint8)
        if p.nbits <= 4:
            flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
            flat = flat[0::2] | (flat[1::2] << 4)
        tensors[f"{name}.lut"] = np.ascontiguousarray(p.lut)
        tensors[f"{name}.indices"] = np.ascontiguousarray(flat)
        layers[name] = {"nbits": p.nbits, "group_size": p.group_size, "shape": list(p.indices.shape)}
    # one metadata entry: safetensors writes a metadata map in hash order, which would give the same palettes
    # different bytes (and the package a different recorded digest) from run to run
    save_file(tensors, str(path), metadata={PALETTE_LAYERS: json.dumps(layers, sort_keys=True)})


def load_palettes(path) -> dict[str, Palette]:
    """The inverse of save_palettes."""
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    # files from before PALETTE_LAYERS hold one metadata entry per layer
    infos = json.loads(meta[PALETTE_LAYERS]) if PALETTE_LAYERS in meta else {name: json.loads(raw) for name, raw in meta.items()}
    palettes = {}
    for name, info in infos.items():
        shape, nbits = tuple(info["shape"]), int(info["nbits"])
        flat = tensors[f"{name}.indices"]
        if nbits <= 4:
            flat = np.stack([flat & 0x0F, flat >> 4], axis=1).reshape(-1)
        n = int(np.prod(shape))
        palettes[name] = Palette(lut=tensors[f"{name}.lut"], indices=flat[:n].reshape(shape), nbits=nbits, group_size=info["group_size"])
    return palettes



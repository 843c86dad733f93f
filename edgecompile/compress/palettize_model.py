"""Palettize a deploy model's weights with edgecompile's k-means and write those exact LUTs into the package.

The torch simulation (the deploy model with decoded weights) and the package decode to the same numbers:
each layer's (lut, indices) reaches coremltools through a `custom` palettizer config for that layer's const.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from edgecompile.compress.kmeans import Palette, palettize
from edgecompile.errors import EdgeCompileError

MIN_ELEMENTS = 2048  # smaller weights stay fp16 (coremltools' own weight_threshold default)


def palettizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (1x1 conv) and convolution whose weight has more than MIN_ELEMENTS elements."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > MIN_ELEMENTS}


def const_name(layer: str) -> str:
    """The Core ML const that holds `layer`'s weight after trace conversion with fp16 compute."""
    return layer.replace(".", "_") + "_weight_to_fp16"


@torch.no_grad()
def palettize_deploy(model: nn.Module, bits: dict[str, int], group_size: int | None = None) -> dict[str, Palette]:
    """Replace each listed layer's weight by its decoded palette (in place); return the palettes."""
    layers = palettizable_layers(model)
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise EdgeCompileError(f"recipe names layer(s) this model does not have or cannot palettize: {', '.join(unknown[:3])}")
    palettes = {}
    for name, nbits in bits.items():
        if nbits >= 16:
            continue
        weight = layers[name].weight
        p = palettize(weight.detach().cpu().numpy(), nbits, group_size)
        weight.copy_(torch.from_numpy(p.decode().astype(np.float32)))
        palettes[name] = p
    return palettes


def uniform_bits(model: nn.Module, nbits: int) -> dict[str, int]:
    return {name: nbits for name in palettizable_layers(model)}


def apply_palettes(mlmodel, palettes: dict[str, Palette]):
    """Write edgecompile's LUTs and indices into the converted model (per-tensor palettes)."""
    from edgecompile.coreml.convert import import_coremltools, quiet_coremltools

    ct = import_coremltools()
    program = mlmodel._mil_program
    consts = {op.name for f in program.functions.values() for op in f.operations if op.op_type == "const"}
    configs = {}
    for layer, p in palettes.items():
        name = const_name(layer)
        if name not in consts:
            raise EdgeCompileError(f"internal: the converted program has no const {name} for layer {layer}")
        if p.group_size is not None:
            raise EdgeCompileError("--group-size needs per-grouped-channel LUTs, which this edgecompile does not write yet")
        lut = p.lut[0]

        def lut_function(weight, lut=lut, layer=layer):
            # Index the weight coremltools holds (its layout may differ from torch's, e.g. conv_transpose):
            # its values are exactly our fp16 LUT entries, so a lookup in the sorted LUT recovers the indices.
            w16 = np.asarray(weight, dtype=np.float16).reshape(-1)
            order = np.argsort(lut, kind="stable")
            pos = np.clip(np.searchsorted(lut[order], w16), 0, len(lut) - 1)
            idx = order[pos]
            if not np.array_equal(lut[idx], w16):
                raise EdgeCompileError(f"internal: the converted weight of {layer} is not made of its palette's values")
            return lut.astype(weight.dtype), idx.astype(np.uint8)

        configs[name] = ct.optimize.coreml.OpPalettizerConfig(mode="custom", lut_function=lut_function, weight_threshold=0)
    config = ct.optimize.coreml.OptimizationConfig(op_name_configs=configs)
    with quiet_coremltools():
        return ct.optimize.coreml.palettize_weights(mlmodel, config)


def bits_metadata(bits: dict[str, int], group_size: int | None) -> dict[str, str]:
    return {"edgecompile.bits_per_layer": json.dumps(bits, sort_keys=True), "edgecompile.group_size": str(group_size or 0)}

"""Palettize a deploy model's weights with edgecompile's k-means and write those exact LUTs into the package.

The torch simulation (the deploy model with decoded weights) and the package decode to the same numbers:
each layer's (lut, indices) reaches coremltools through a `custom` palettizer config for that layer's const.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from edgecompile.compress.kmeans import Palette
from edgecompile.errors import EdgeCompileError

MIN_ELEMENTS = 2048  # smaller weights stay fp16 (coremltools' own weight_threshold default)


def palettizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (1x1 conv) and convolution whose weight has more than MIN_ELEMENTS elements."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > MIN_ELEMENTS}


def layer_shapes(config, width: float, latent_hw: tuple[int, int]) -> dict[str, nn.Module]:
    """The palettizable layers of a width's deploy graph, built on the meta device: names and shapes, no memory."""
    from edgecompile.deploy.dit import DeployDiT
    from edgecompile.model.elastic import width_config

    with torch.device("meta"):
        return palettizable_layers(DeployDiT(width_config(config, width), latent_hw))


def check_group_size(layers: dict[str, nn.Module], group_size: int, width: float) -> None:
    """Grouped LUTs split output channels into equal groups: refuse, before any work, a size that does not divide."""
    rows = sorted({m.weight.shape[0] for m in layers.values() if m.weight.shape[0] % group_size})
    if rows:
        raise EdgeCompileError(f"--group-size {group_size} does not divide the output channels of every layer of width {width:g} "
                               f"({', '.join(map(str, rows[:4]))}): use a common divisor of them")


def const_name(layer: str) -> str:
    """The Core ML const that holds `layer`'s weight after trace conversion with fp16 compute."""
    return layer.replace(".", "_") + "_weight_to_fp16"


@torch.no_grad()
def palettize_deploy(model: nn.Module, bits: dict[str, int], group_size: int | None = None, cache=None) -> dict[str, Palette]:
    """Replace each listed layer's weight by its decoded palette; return the palettes.

    The weight is replaced by a new parameter, not written into: deploy weights may be views of the checkpoint.
    `cache` (a PaletteCache over a model with the same weights) supplies palettes already computed by the sweep."""
    from edgecompile.compress.sensitivity import PaletteCache

    layers = palettizable_layers(model)
    cache = cache or PaletteCache(model, group_size)
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise EdgeCompileError(f"recipe names layer(s) this model does not have or cannot palettize: {', '.join(unknown[:3])}")
    palettes = {}
    for name, nbits in bits.items():
        if nbits >= 16:
            continue
        p = cache.palette(name, nbits)
        layers[name].weight = nn.Parameter(torch.from_numpy(p.decode().astype(np.float32)), requires_grad=False)
        palettes[name] = p
    return palettes


def uniform_bits(model: nn.Module, nbits: int) -> dict[str, int]:
    return {name: nbits for name in palettizable_layers(model)}


def palettization_config(ct, palettes: dict[str, Palette]):
    """coremltools' palettizer config that writes edgecompile's LUTs and indices, one `custom` config per const."""
    return ct.optimize.coreml.OptimizationConfig(op_name_configs={const_name(layer): _custom_config(ct, p, layer) for layer, p in palettes.items()})


def check_palettized(mlmodel, palettes: dict[str, Palette]) -> None:
    """Every palettized layer must have become a LUT op (a const renamed by coremltools would be skipped silently)."""
    luts = set()
    for function in mlmodel.get_spec().mlProgram.functions.values():
        for block in function.block_specializations.values():
            luts.update(out.name for op in block.operations if op.type == "constexpr_lut_to_dense" for out in op.outputs)
    missing = sorted(layer for layer in palettes if f"{const_name(layer)}_palettized" not in luts)
    if missing:
        raise EdgeCompileError(f"internal: the converted program has no palettized weight for layer(s) {', '.join(missing[:3])}")


def _custom_config(ct, p: Palette, layer: str):
    """A `custom` palettizer config that hands coremltools this layer's LUT(s) and indices.

    coremltools calls lut_function once per group of output channels, in order (axis 0, the layout of a conv
    weight in both torch and MIL); per-tensor palettes are the one-group case."""
    groups = iter(range(len(p.lut)))

    def lut_function(weight, layer=layer):
        # Index the weight coremltools holds (its layout may differ from torch's, e.g. conv_transpose):
        # its values are exactly our fp16 LUT entries, so a lookup in the sorted LUT recovers the indices.
        lut = p.lut[next(groups)]
        w16 = np.asarray(weight, dtype=np.float16).reshape(-1)
        order = np.argsort(lut, kind="stable")
        pos = np.clip(np.searchsorted(lut[order], w16), 0, len(lut) - 1)
        idx = order[pos]
        if not np.array_equal(lut[idx], w16):
            raise EdgeCompileError(f"internal: the converted weight of {layer} is not made of its palette's values")
        return lut.astype(weight.dtype), idx.astype(np.uint8)

    if p.group_size is None:
        return ct.optimize.coreml.OpPalettizerConfig(mode="custom", lut_function=lut_function, weight_threshold=0)
    return ct.optimize.coreml.OpPalettizerConfig(mode="custom", lut_function=lut_function, weight_threshold=0,
                                                 granularity="per_grouped_channel", group_size=p.group_size, channel_axis=0)


def bits_metadata(bits: dict[str, int], group_size: int | None) -> dict[str, str]:
    return {"edgecompile.bits_per_layer": json.dumps(bits, sort_keys=True), "edgecompile.group_size": str(group_size or 0)}

"""Write edgecompile's own LUTs and indices into a converted package: each layer's palette reaches coremltools
through a `custom` palettizer config for that layer's const, and every palettized layer is checked to have
become a LUT op. The palettes themselves come from compress/palettize_model.py."""

from __future__ import annotations

import numpy as np

from edgecompile.compress.kmeans import Palette
from edgecompile.errors import EdgeCompileError


PALETTIZE_PASS = "compression::palettize_weights"  # coremltools' palettizer, run as the conversion's last pass


def pass_const_name(layer: str) -> str:
    """The const that holds `layer`'s weight at the end of the conversion pipeline (trace names, fp16 compute)."""
    return f"{layer}.weight_to_fp16"


def const_name(layer: str) -> str:
    """The same const's name in the saved program (the backend turns dots into underscores)."""
    return pass_const_name(layer).replace(".", "_")


def palettization_config(ct, palettes: dict[str, Palette]):
    """coremltools' palettizer config that writes edgecompile's LUTs and indices, one `custom` config per const."""
    return ct.optimize.coreml.OptimizationConfig(
        op_name_configs={pass_const_name(layer): _custom_config(ct, p, layer) for layer, p in palettes.items()})


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

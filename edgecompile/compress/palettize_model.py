"""Palettize a deploy model's weights with edgecompile's k-means: which layers, their palettes (computed once
per layer and bit-width), and the torch simulation (the deploy model with decoded weights). coreml/palettize.py
writes these exact LUTs into the package, so the simulation and the package decode to the same numbers.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from edgecompile.compress.kmeans import Palette, palettize
from edgecompile.deploy.dit import DeployDiT
from edgecompile.errors import EdgeCompileError
from edgecompile.model.elastic import width_config

MIN_ELEMENTS = 2048  # smaller weights stay fp16 (coremltools' own weight_threshold default)


def palettizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (1x1 conv) and convolution whose weight has more than MIN_ELEMENTS elements."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > MIN_ELEMENTS}


def layer_shapes(config, width: float, latent_hw: tuple[int, int]) -> dict[str, nn.Module]:
    """The palettizable layers of a width's deploy graph, built on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return palettizable_layers(DeployDiT(width_config(config, width), latent_hw))


def check_group_size(layers: dict[str, nn.Module], group_size: int, width: float) -> None:
    """Grouped LUTs split output channels into equal groups: refuse, before any work, a size that does not divide."""
    rows = sorted({m.weight.shape[0] for m in layers.values() if m.weight.shape[0] % group_size})
    if rows:
        raise EdgeCompileError(f"--group-size {group_size} does not divide the output channels of every layer of width {width:g} "
                               f"({', '.join(map(str, rows[:4]))}): use a common divisor of them")


class PaletteCache:
    """k-means palettes of a deploy model's layers, computed once per (layer, bits) and reused by the sweep,
    the allocation's checks and the export."""

    def __init__(self, model: nn.Module, group_size: int | None = None):
        self.layers = palettizable_layers(model)
        self.group_size = group_size
        self._palettes: dict[tuple[str, int], Palette] = {}
        self.kmeans_seconds = 0.0

    def group_for(self, layer: str) -> int | None:
        # Grouped LUTs run along output channels, which is axis 0 of a Conv2d weight only (see palettize_model._custom_config).
        return self.group_size if isinstance(self.layers[layer], nn.Conv2d) else None

    def palette(self, layer: str, nbits: int) -> Palette:
        key = (layer, nbits)
        if key not in self._palettes:
            start = time.perf_counter()
            weight = self.layers[layer].weight.detach().cpu().numpy()
            self._palettes[key] = palettize(weight, nbits, self.group_for(layer))
            self.kmeans_seconds += time.perf_counter() - start
        return self._palettes[key]

    def decoded(self, layer: str, nbits: int) -> torch.Tensor:
        """The decoded weight, on the layer's device (k-means itself runs on the CPU, where it is fast)."""
        weight = torch.from_numpy(self.palette(layer, nbits).decode().astype(np.float32))
        return weight.to(self.layers[layer].weight.device)


@torch.no_grad()
def palettize_deploy(model: nn.Module, bits: dict[str, int], group_size: int | None = None, cache=None) -> dict[str, Palette]:
    """Replace each listed layer's weight by its decoded palette; return the palettes.

    The weight is replaced by a new parameter, not written into: deploy weights may be views of the checkpoint.
    `cache` (a PaletteCache over a model with the same weights) supplies palettes already computed by the sweep."""
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
        decoded = torch.from_numpy(p.decode().astype(np.float32)).to(layers[name].weight.device)
        layers[name].weight = nn.Parameter(decoded, requires_grad=False)
        palettes[name] = p
    return palettes


def uniform_bits(model: nn.Module, nbits: int) -> dict[str, int]:
    return {name: nbits for name in palettizable_layers(model)}

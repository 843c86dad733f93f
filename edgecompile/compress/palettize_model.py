"""Palettize a deploy model's weights: which layers, their palettes (computed once per layer and bit-width), the
torch simulation (the deploy model with decoded weights), and the palettes file saved beside a package.
coreml/palettize.py writes these exact LUTs and indices into the package, so the simulation and the package
decode to the same numbers.

Three palette methods (`--palettes`):
- output-aware (default): the LUT from k-means weighted by each element's diagonal Fisher information (what an
  error in it costs at the denoiser's output), the indices from error-compensating rounding under the layer's
  input second moments (compress/rounding.py);
- weighted: the same weighted LUT, each element at its nearest entry;
- plain: k-means on the weight values alone, nearest entry (weight error only; needs no calibration data).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgecompile.compress.calibration import CalibrationSet
from edgecompile.compress.importance import LayerStatistics, SecondMoment, as_matrix, from_matrix, measure_statistics
from edgecompile.compress.kmeans import Palette, palettize
from edgecompile.compress.rounding import inverse_cholesky_upper, output_aware_indices, rounding_dtype
from edgecompile.deploy.dit import DeployDiT
from edgecompile.choices import KEEP_FP16, PaletteMethod
from edgecompile.errors import EdgeCompileError
from edgecompile.model.device import release_freed_host_memory
from edgecompile.model.elastic import width_config

MIN_ELEMENTS = 2048  # smaller weights stay fp16 (coremltools' own weight_threshold default)
FACTORS_KEPT = 4  # inverse Cholesky factors cached by PaletteCache (a paper-scale FFN's is 118 MB in float64)
ROUNDING_ROWS = 8192  # rows rounded together under one H: 8192 x 3840 float64 columns is 250 MB


def _row_batches(keys: list, rows_of: Callable, limit: int) -> list[list]:
    """`keys` in runs whose rows add up to at most `limit` (a key with more rows alone)."""
    parts, part, total = [], [], 0
    for key in keys:
        rows = rows_of(key)
        if part and total + rows > limit:
            parts.append(part)
            part, total = [], 0
        part.append(key)
        total += rows
    return parts + ([part] if part else [])
DEFAULT_PALETTE_METHOD = PaletteMethod.OUTPUT_AWARE


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
    """Palettes of a deploy model's layers, computed once per (layer, bits) and reused by the sweep, the
    allocation's checks and the export. `statistics` (importance.measure_statistics on the same model) is what
    the weighted and output-aware methods need: given here, or a group of layers' at a time (prepare_in_groups),
    each released once its layers' palettes are made."""

    def __init__(self, model: nn.Module, group_size: int | None = None, method: str = "plain",
                 statistics: LayerStatistics | None = None):
        method = PaletteMethod.parse(method, "--palettes")
        self.layers = palettizable_layers(model)
        self.group_size = group_size
        self.method = method
        self.statistics = statistics
        self._palettes: dict[tuple[str, int], Palette] = {}
        # the last few H's inverse Cholesky factors: the sweep asks for a layer's bit-widths in turn, and layers that
        # read one input (q, k, v; every block's text K and V) share one H (importance.measure_statistics)
        self._factors: collections.OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self.kmeans_seconds = 0.0
        self.rounding_seconds = 0.0

    def group_for(self, layer: str) -> int | None:
        # Grouped LUTs run along output channels, which is axis 0 of a Conv2d weight only (see palettize_model._custom_config).
        return self.group_size if isinstance(self.layers[layer], nn.Conv2d) else None

    def palette(self, layer: str, nbits: int) -> Palette:
        if (layer, nbits) not in self._palettes:
            self.prepare([layer], [nbits])
        return self._palettes[(layer, nbits)]

    def release_statistics(self) -> None:
        """Let go of the statistics (and the factors of their H): the palettes made from them stay."""
        self.statistics = None
        self._factors.clear()

    def prepare(self, layers: list[str], candidates: list[int], progress: Callable[[int, int], None] | None = None) -> None:
        """The palettes of every layer at every candidate bit-width: k-means for each, then, for output-aware ones,
        error-compensating indices for all the layers and bit-widths that share one H at once (their rows stacked
        under one factor: one pass over the columns where there was one per layer and bit-width; q, k and v, and
        every block's text K and V, share theirs). `progress(done, total)` counts layers."""
        todo = [(n, b) for n in layers for b in candidates if (n, b) not in self._palettes]
        if todo and self.method != "plain" and (self.statistics is None or todo[0][0] not in self.statistics.fisher):
            raise EdgeCompileError(f"internal: --palettes {self.method} needs the layer statistics of {todo[0][0]} for its "
                                   f"{todo[0][1]}-bit palette, and they are not held (prepare_in_groups makes every palette it is given)")
        plain: dict[tuple[str, int], Palette] = {}
        for i, (name, nbits) in enumerate(todo):
            start = time.perf_counter()
            mod = self.layers[name]
            importance = self.statistics.element_weights(mod, name) if self.method != "plain" else None
            plain[(name, nbits)] = palettize(mod.weight.detach().cpu().numpy(), nbits, self.group_for(name), importance)
            self.kmeans_seconds += time.perf_counter() - start
            if self.method != "output-aware":
                self._palettes[(name, nbits)] = plain[(name, nbits)]
            if progress and (i + 1 == len(todo) or todo[i + 1][0] != name):
                progress(layers.index(name) + 1, len(layers))
        if self.method != "output-aware":
            return
        start = time.perf_counter()
        by_hessian: dict[int, list[tuple[str, int]]] = {}
        for key in todo:
            by_hessian.setdefault(id(self.statistics.hessian[key[0]]), []).append(key)
        for keys in by_hessian.values():
            for part in _row_batches(keys, lambda k: as_matrix(self.layers[k[0]], self.layers[k[0]].weight).shape[0], ROUNDING_ROWS):
                self._palettes.update(self._output_aware(part, plain))
                release_freed_host_memory()  # the rows' float64 work, freed: 0.6 GiB less at the peak (sweep_scale)
        self.rounding_seconds += time.perf_counter() - start

    def _output_aware(self, keys: list[tuple[str, int]], plain: dict[tuple[str, int], Palette]) -> dict[tuple[str, int], Palette]:
        """The LUTs k-means chose for `keys` (layers sharing one H), indices chosen by error-compensating rounding
        on the statistics' device: the layers' rows stacked, each row with its own LUT (padded to the largest with
        +inf, which no weight rounds to)."""
        hessian = self.statistics.hessian[keys[0][0]]
        matrices, luts = [], []
        for name, nbits in keys:
            mod, p = self.layers[name], plain[(name, nbits)]
            weight = torch.from_numpy(np.ascontiguousarray(mod.weight.detach().cpu().numpy(), dtype=np.float16).astype(np.float32))
            matrix = as_matrix(mod, weight)
            lut = torch.from_numpy(p.lut.astype(np.float32))
            # grouped LUTs are runs of output channels, the rows of a Conv2d's matrix (group_for: ConvTranspose2d has one)
            matrices.append(matrix)
            luts.append(lut[torch.arange(matrix.shape[0]) // (matrix.shape[0] // len(lut))])
        width = max(lut.shape[1] for lut in luts)
        luts = [torch.nn.functional.pad(lut, (0, width - lut.shape[1]), value=float("inf")) for lut in luts]
        matrix, row_luts = torch.cat(matrices), torch.cat(luts)
        # a grouped conv's groups are independent blocks of rows and columns, each with its own H
        per_group = matrix.shape[0] // len(hessian)
        idx = torch.cat([output_aware_indices(matrix[g * per_group:(g + 1) * per_group].to(hessian.device), None,
                                              row_luts[g * per_group:(g + 1) * per_group].to(hessian.device), self._factor(hessian, g)).cpu()
                         for g in range(len(hessian))]) if len(keys) == 1 or len(hessian) == 1 else None
        if idx is None:  # grouped convs sharing an H: one at a time (their rows are split by group, not by layer)
            out = {}
            for key in keys:
                out.update(self._output_aware([key], plain))
            return out
        out, row = {}, 0
        for (name, nbits), m in zip(keys, matrices):
            p, mod = plain[(name, nbits)], self.layers[name]
            indices = from_matrix(mod, idx[row:row + m.shape[0]], tuple(mod.weight.shape)).to(torch.uint8).numpy()
            out[(name, nbits)] = Palette(lut=p.lut, indices=np.ascontiguousarray(indices), nbits=p.nbits, group_size=p.group_size)
            row += m.shape[0]
        return out

    def _factor(self, hessian: SecondMoment, group: int) -> torch.Tensor:
        key = (id(hessian), group)
        hit = self._factors.get(key)
        if hit is not None and hit[0] is hessian:
            self._factors.move_to_end(key)
            return hit[1]
        factor = inverse_cholesky_upper(hessian.matrix(group).to(rounding_dtype(hessian.device)))  # H formed here, once
        self._factors[key] = (hessian, factor)  # holds H too, so that its id is not reused while cached
        while len(self._factors) > FACTORS_KEPT:
            self._factors.popitem(last=False)
        return factor

    def decoded(self, layer: str, nbits: int) -> torch.Tensor:
        """The decoded weight, on the layer's device (k-means itself runs on the CPU, where it is fast)."""
        weight = torch.from_numpy(self.palette(layer, nbits).decode().astype(np.float32))
        return weight.to(self.layers[layer].weight.device)


@dataclass
class StatisticsPass:
    """What prepare_in_groups measured, its sums let go."""

    reference: torch.Tensor  # the unquantized outputs on the calibration inputs (CPU)
    seconds: float  # the statistics' passes, every group's
    forward_seconds: float  # one plain forward pass over the same inputs, in the same run
    palette_seconds: float  # k-means and error-compensating rounding of the palettes made
    groups: int

    @property
    def cost_forward_passes(self) -> float:
        return self.seconds / max(self.forward_seconds, 1e-9)


def prepare_in_groups(cache: PaletteCache, model: nn.Module, calib: CalibrationSet, needed: dict[str, list[int]],
                      groups: list[list[str]], batch_size: int = 64, gradient_batch_size: int | None = None,
                      on_group: Callable[[LayerStatistics, list[str]], None] | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> StatisticsPass:
    """Every palette `needed` ({layer: bit-widths}) into `cache`, the layer statistics measured one group of layers at a
    time (importance.statistics_groups) and let go before the next: `on_group(statistics, layers)` reads a group's
    while they are held (the propagated sweep scores its layers). `cache` keeps the palettes, not the statistics.

    Why groups: F and H are each about as large as the weights (11 GiB at the paper's width 1.0, with 5.5 GiB of
    weights), and a pass held them all. A layer's statistics do not depend on the other layers measured with it, so
    groups give the palettes one pass would; each group costs one more forward pass over the calibration inputs
    (and a backward pass from the output to the group's first layer)."""
    seconds, palette_seconds, forward_seconds, reference = 0.0, 0.0, None, None
    for i, group in enumerate(groups):
        label = (lambda what: f"{what}, layer group {i + 1} of {len(groups)}") if len(groups) > 1 else (lambda what: what)
        stats = measure_statistics(model, {n: cache.layers[n] for n in group}, calib, batch_size, gradient_batch_size=gradient_batch_size,
                                   forward_seconds=forward_seconds,
                                   progress=(lambda what, done, total: progress(label(what), done, total)) if progress else None)
        seconds += stats.seconds
        forward_seconds = stats.forward_seconds
        reference = stats.reference if reference is None else reference
        cache.statistics = stats
        start = time.perf_counter()
        by_bits: dict[tuple[int, ...], list[str]] = {}
        for name in group:
            if needed.get(name):
                by_bits.setdefault(tuple(sorted(needed[name])), []).append(name)
        for bits, names in by_bits.items():  # layers sharing an H rounded together
            cache.prepare(names, list(bits), (lambda done, total: progress(label("palettes"), done, total)) if progress else None)
        palette_seconds += time.perf_counter() - start
        if on_group is not None:
            on_group(stats, group)
        cache.release_statistics()
        del stats
        release_freed_host_memory()
    return StatisticsPass(reference=reference, seconds=seconds, forward_seconds=forward_seconds or 0.0,
                          palette_seconds=palette_seconds, groups=len(groups))


@torch.no_grad()
def apply_palettes(model: nn.Module, palettes: dict[str, Palette], share_with: nn.Module | None = None) -> None:
    """Give each layer its decoded palette as a new parameter (not written into: deploy weights may be views of
    the checkpoint). `share_with`: a model already given these palettes (the export graph), whose decoded weights
    this one takes where they live on its device: the distillation student trains biases and norms only, and a
    second decoded copy of every palettized weight is 5.5 GiB at the paper's width 1.0."""
    layers = palettizable_layers(model)
    unknown = sorted(set(palettes) - set(layers))
    if unknown:
        raise EdgeCompileError(f"palettes name layer(s) this model does not have or cannot palettize: {', '.join(unknown[:3])}")
    given = palettizable_layers(share_with) if share_with is not None else {}
    for name, p in palettes.items():
        weight = layers[name].weight
        if tuple(p.indices.shape) != tuple(weight.shape):
            raise EdgeCompileError(f"the palette of layer {name} has shape {tuple(p.indices.shape)}, the layer {tuple(weight.shape)}")
        other = given[name].weight if name in given else None
        if other is not None and other.device == weight.device and other.shape == weight.shape and not other.requires_grad:
            layers[name].weight = other  # the same decoded parameter, not a copy
            continue
        decoded = torch.from_numpy(p.decode().astype(np.float32)).to(weight.device)
        layers[name].weight = nn.Parameter(decoded, requires_grad=False)


@torch.no_grad()
def palettize_deploy(model: nn.Module, bits: dict[str, int], group_size: int | None = None, cache=None,
                     share_with: nn.Module | None = None) -> dict[str, Palette]:
    """Replace each listed layer's weight by its decoded palette; return the palettes.

    `cache` (a PaletteCache over a model with the same weights) supplies palettes already computed by the sweep,
    and decides the palette method (plain k-means without one). `share_with`: see apply_palettes."""
    palettes = palettes_for(model, bits, group_size, cache)
    apply_palettes(model, palettes, share_with)
    return palettes


def palettes_for(model: nn.Module, bits: dict[str, int], group_size: int | None = None, cache=None) -> dict[str, Palette]:
    """The palette of each listed layer at its bit-width (`palettize_deploy` without replacing any weight)."""
    layers = palettizable_layers(model)
    cache = cache or PaletteCache(model, group_size)
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise EdgeCompileError(f"recipe names layer(s) this model does not have or cannot palettize: {', '.join(unknown[:3])}")
    for nbits in sorted({b for b in bits.values() if b < KEEP_FP16}):  # layers sharing an H rounded together
        cache.prepare([n for n, b in bits.items() if b == nbits], [nbits])
    return {name: cache.palette(name, nbits) for name, nbits in bits.items() if nbits < KEEP_FP16}


def uniform_bits(model: nn.Module, nbits: int) -> dict[str, int]:
    return {name: nbits for name in palettizable_layers(model)}

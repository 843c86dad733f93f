"""Per-layer sensitivity to palettization: which layers deserve more bits (SnapGen++ supplementary C).

Three modes:
- local (the paper's): each layer's own output error when only its weight is palettized, normalised by the
  energy of its unquantized output (NMSE), so layers of different scale compare. All layers and bit-widths are
  measured in ONE calibration forward pass of the unquantized model: a forward hook on every layer computes
  conv(x, W_q - W) for each candidate palette on the input it just saw. The extra work is one more layer
  evaluation per candidate, so the cost is about (1 + candidates x linear share) forward passes, whatever the
  number of layers.
- e2e (Apple's ml-stable-diffusion): the whole denoiser's output MSE (and PSNR) against the unquantized output
  with only that layer palettized: one calibration forward pass per layer and bit-width.
- propagated (edgecompile's): the denoiser-output MSE each layer's palette is predicted to cause, from the
  layer statistics (importance.py: the diagonal Fisher information of the output in every weight, corrected by
  the layer's input correlations; one forward pass and a backward pass on a third of the inputs). No pass per
  layer or bit-width: every candidate is scored from its weight change alone.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgecompile.compress.hooks import forward_hooks
from edgecompile.compress.calibration import CalibrationSet
from edgecompile.compress.importance import LayerStatistics
from edgecompile.compress.palettize_model import PaletteCache, StatisticsPass, prepare_in_groups
from edgecompile.choices import KEEP_FP16, SweepMode
from edgecompile.metrics import psnr_db
from edgecompile.model.device import device_of

DEFAULT_MODE = SweepMode.PROPAGATED
Progress = Callable[[str, int, int], None]  # (description, done, total)


@contextmanager
def swapped_weights(layers: dict[str, nn.Module], weights: dict[str, torch.Tensor]):
    """Temporarily give layers other weights (new parameters: the originals may be views of a checkpoint)."""
    saved = {name: layers[name].weight for name in weights}
    try:
        for name, w in weights.items():
            layers[name].weight = nn.Parameter(w, requires_grad=False)
        yield
    finally:
        for name, w in saved.items():
            layers[name].weight = w


@contextmanager
def decoded_on_call(cache: PaletteCache, bits: dict[str, int]):
    """Give each layer in `bits` (below KEEP_FP16) its decoded palette for the length of each call only: one layer's
    decoded weight is held at a time, where swapping them all in held a second copy of every weight (5.5 GiB at the
    paper's width 1.0, on top of the weights and the palettes). Decoding is a gather per call, small beside the call."""
    def before(name):
        def hook(mod, inputs):
            saved[name] = mod.weight
            mod.weight = nn.Parameter(cache.decoded(name, bits[name]), requires_grad=False)
        return hook

    def after(name):
        def hook(mod, inputs, output):
            mod.weight = saved.pop(name)
        return hook

    saved: dict[str, nn.Parameter] = {}
    chosen = {n: cache.layers[n] for n, b in bits.items() if b < KEEP_FP16}
    handles = [m.register_forward_pre_hook(before(n)) for n, m in chosen.items()]
    handles += [m.register_forward_hook(after(n)) for n, m in chosen.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name, w in saved.items():  # a call that raised
            cache.layers[name].weight = w


@torch.no_grad()
def calibration_outputs(model: nn.Module, calib: CalibrationSet, batch_size: int = 64) -> torch.Tensor:
    """The model's outputs on the calibration set, run on the model's device and kept on the CPU."""
    return torch.cat([model(x, t, c).cpu() for x, t, c in calib.batches(batch_size, device_of(model))])


def output_psnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Denoiser-output PSNR over the whole calibration set (Apple's definition, one peak for all inputs)."""
    return psnr_db(reference.numpy(), output.numpy())


def layer_delta(mod: nn.Module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """The change of `mod`'s output when its weight changes by dw (bias cancels)."""
    if isinstance(mod, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, dw, None, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
    return F.conv2d(x, dw, None, mod.stride, mod.padding, mod.dilation, mod.groups)


@dataclass
class SweepResult:
    mode: str
    candidates: list[int]
    sizes: dict[str, int]
    sensitivity: dict[str, dict[int, float]]  # local: NMSE of the layer's output; e2e, propagated: denoiser-output MSE
    psnr_db: dict[str, dict[int, float]] = field(default_factory=dict)  # e2e only: denoiser-output PSNR
    seconds: float = 0.0
    kmeans_seconds: float = 0.0
    forward_seconds: float = 0.0  # one plain forward pass over the calibration set, measured in the same run
    cost_forward_passes: float = 0.0  # (sweep time excluding k-means) / forward_seconds
    reference: torch.Tensor | None = None  # the unquantized outputs on the calibration set
    statistics_groups: int | None = None  # propagated: the layer groups the statistics were measured in

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "candidates": self.candidates, "seconds": round(self.seconds, 3),
            "kmeans_seconds": round(self.kmeans_seconds, 3), "forward_seconds": round(self.forward_seconds, 4),
            "cost_forward_passes": round(self.cost_forward_passes, 2),
            **({"statistics_groups": self.statistics_groups} if self.statistics_groups is not None else {}),
        }


@dataclass
class PropagatedScores:
    """The propagated sweep's signal, measured before the sweep allocates (propagated_scores)."""

    sensitivity: dict[str, dict[int, float]]  # denoiser-output MSE per layer and candidate
    statistics: StatisticsPass
    scoring_seconds: float


def _layer_scores(stats: LayerStatistics, cache: PaletteCache, layers: list[str], candidates: list[int]) -> dict[str, dict[int, float]]:
    return {n: dict(zip(candidates, stats.predicted_mses(cache.layers[n], n, [cache.decoded(n, b) - cache.layers[n].weight.detach() for b in candidates])))
            for n in layers}


@torch.no_grad()
def propagated_scores(model: nn.Module, calib: CalibrationSet, cache: PaletteCache, candidates: list[int],
                      groups: list[list[str]] | None = None, batch_size: int = 64, gradient_batch_size: int | None = None,
                      progress: Progress | None = None) -> PropagatedScores:
    """Every layer's predicted denoiser-output MSE at each candidate bit-width, and every candidate's palette in `cache`.

    The layer statistics are measured a group of layers at a time (`groups`, importance.statistics_groups; default
    one group) and let go once the group is scored and its palettes made (palettize_model.prepare_in_groups); where
    `cache` already holds statistics of every layer, those are used and kept."""
    layers, scoring = list(cache.layers), 0.0
    sensitivity: dict[str, dict[int, float]] = {}

    def score(stats: LayerStatistics, group: list[str]) -> None:
        nonlocal scoring
        start = time.perf_counter()
        sensitivity.update(_layer_scores(stats, cache, group, candidates))
        scoring += time.perf_counter() - start

    held = cache.statistics
    if held is not None:
        start = time.perf_counter()
        cache.prepare(layers, list(candidates), (lambda done, total: progress("palettes", done, total)) if progress else None)
        run = StatisticsPass(reference=held.reference, seconds=held.seconds, forward_seconds=held.forward_seconds,
                             palette_seconds=time.perf_counter() - start, groups=1)
        score(held, layers)
    else:
        run = prepare_in_groups(cache, model, calib, dict.fromkeys(layers, list(candidates)), groups or [layers], batch_size,
                                gradient_batch_size, on_group=score, progress=progress)
    return PropagatedScores(sensitivity={n: sensitivity[n] for n in layers}, statistics=run, scoring_seconds=scoring)


@torch.no_grad()
def sweep(model: nn.Module, calib: CalibrationSet, candidates: list[int], mode: str = DEFAULT_MODE,
          cache: PaletteCache | None = None, batch_size: int = 64, progress: Progress | None = None,
          scores: PropagatedScores | None = None) -> SweepResult:
    """Sensitivity of every palettizable layer of a deploy model to each candidate bit-width.

    The propagated mode takes `scores` (propagated_scores, measured before), or measures them here from the cache's
    statistics or, where it holds none, new ones."""
    mode = SweepMode.parse(mode, "--sweep-mode")
    cache = cache or PaletteCache(model)
    layers = cache.layers
    start = time.perf_counter()
    if mode == "propagated":
        scores = scores or propagated_scores(model, calib, cache, list(candidates), batch_size=batch_size, progress=progress)
        run = scores.statistics
        result = SweepResult(mode, list(candidates), {n: m.weight.numel() for n, m in layers.items()}, dict(scores.sensitivity),
                             reference=run.reference, statistics_groups=run.groups)
        result.seconds = run.seconds + run.palette_seconds + scores.scoring_seconds  # the sweep's work, wherever it ran
        result.kmeans_seconds = run.palette_seconds
        result.forward_seconds = run.forward_seconds
        result.cost_forward_passes = (run.seconds + scores.scoring_seconds) / max(run.forward_seconds, 1e-9)  # the statistics pass is the sweep's cost
        return result
    # palettes first, timed apart from the measurement
    kmeans_before = cache.kmeans_seconds + cache.rounding_seconds
    cache.prepare(list(layers), list(candidates), (lambda done, total: progress("palettes", done, total)) if progress else None)
    kmeans_seconds = cache.kmeans_seconds + cache.rounding_seconds - kmeans_before
    t0 = time.perf_counter()
    reference = calibration_outputs(model, calib, batch_size)  # also the cost unit: one plain forward pass
    forward_seconds = time.perf_counter() - t0
    result = SweepResult(mode, list(candidates), {n: m.weight.numel() for n, m in layers.items()}, {}, reference=reference)
    t_measure = time.perf_counter()
    if mode == "local":
        _local(model, calib, candidates, cache, batch_size, result, progress)
        measure_seconds = time.perf_counter() - t_measure
    else:
        _e2e(model, calib, candidates, cache, batch_size, result, reference, progress)
        measure_seconds = time.perf_counter() - t_measure + forward_seconds  # the reference pass is part of it
    result.seconds = time.perf_counter() - start
    result.kmeans_seconds = kmeans_seconds
    result.forward_seconds = forward_seconds
    result.cost_forward_passes = measure_seconds / max(forward_seconds, 1e-9)
    return result


def _local(model, calib, candidates, cache, batch_size, result, progress):
    layers = cache.layers
    deltas = {(n, b): (cache.decoded(n, b) - m.weight.detach()) for n, m in layers.items() for b in candidates}
    err = {n: {b: 0.0 for b in candidates} for n in layers}
    energy = dict.fromkeys(layers, 0.0)

    def hook_for(name):
        def hook(mod, inputs, output):
            x = inputs[0]
            energy[name] += float(output.double().pow(2).sum())
            for b in candidates:
                err[name][b] += float(layer_delta(mod, x, deltas[(name, b)]).double().pow(2).sum())
        return hook

    with forward_hooks(layers, hook_for):
        n_batches = (len(calib) + batch_size - 1) // batch_size
        for i, (x, t, c) in enumerate(calib.batches(batch_size, device_of(model))):
            model(x, t, c)
            if progress:
                progress("local sweep (one forward pass, all layers)", i + 1, n_batches)
    result.sensitivity = {n: {b: err[n][b] / max(energy[n], 1e-30) for b in candidates} for n in layers}


def _e2e(model, calib, candidates, cache, batch_size, result, reference, progress):
    layers = cache.layers
    total = len(layers) * len(candidates)
    done = 0
    for name in layers:
        result.sensitivity[name], result.psnr_db[name] = {}, {}
        for b in candidates:
            with swapped_weights(layers, {name: cache.decoded(name, b)}):
                out = calibration_outputs(model, calib, batch_size)
            result.sensitivity[name][b] = float((out - reference).double().pow(2).mean())
            result.psnr_db[name][b] = output_psnr(reference, out)
            done += 1
            if progress:
                progress("e2e sweep (one forward pass per layer and bit-width)", done, total)

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
from edgecompile.compress.importance import measure_statistics
from edgecompile.compress.palettize_model import PaletteCache
from edgecompile.choices import SweepMode
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

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "candidates": self.candidates, "seconds": round(self.seconds, 3),
            "kmeans_seconds": round(self.kmeans_seconds, 3), "forward_seconds": round(self.forward_seconds, 4),
            "cost_forward_passes": round(self.cost_forward_passes, 2),
        }


@torch.no_grad()
def sweep(model: nn.Module, calib: CalibrationSet, candidates: list[int], mode: str = DEFAULT_MODE,
          cache: PaletteCache | None = None, batch_size: int = 64, progress: Progress | None = None) -> SweepResult:
    """Sensitivity of every palettizable layer of a deploy model to each candidate bit-width.

    The propagated mode uses the cache's layer statistics (measured here if the cache has none)."""
    mode = SweepMode.parse(mode, "--sweep-mode")
    cache = cache or PaletteCache(model)
    layers = cache.layers
    start = time.perf_counter()
    kmeans_before = cache.kmeans_seconds + cache.rounding_seconds
    stats = cache.statistics
    if mode == "propagated" and stats is None:
        stats = measure_statistics(model, layers, calib, batch_size, progress=progress)
    # palettes first, timed apart from the measurement
    cache.prepare(list(layers), list(candidates), (lambda done, total: progress("palettes", done, total)) if progress else None)
    kmeans_seconds = cache.kmeans_seconds + cache.rounding_seconds - kmeans_before
    if mode == "propagated":
        t_measure = time.perf_counter()
        result = SweepResult(mode, list(candidates), {n: m.weight.numel() for n, m in layers.items()}, {}, reference=stats.reference)
        result.sensitivity = {n: dict(zip(candidates, stats.predicted_mses(m, n, [cache.decoded(n, b) - m.weight.detach() for b in candidates])))
                              for n, m in layers.items()}
        forward_seconds = stats.forward_seconds
        measure_seconds = stats.seconds + time.perf_counter() - t_measure  # the statistics pass is the sweep's cost
    else:
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

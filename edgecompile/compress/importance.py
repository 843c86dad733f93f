"""What each layer's weight error costs at the denoiser's output, measured on calibration inputs in one forward
and one backward pass: the statistics behind edgecompile's output-aware palettes and its `propagated` sweep.

Every palettizable layer is a linear map from columns (input channels x kernel taps) to rows (output channels,
times kernel taps for the transposed conv), `as_matrix`. For a weight change dW of one layer, the change of the
layer's output at one position is dW x, and the change of the denoiser's output is J (dW x). Two factors of the
Gauss-Newton (K-FAC) approximation of the damage E||J dW x||^2 are measured per layer:

- `hessian` H = sum over inputs and positions of x x^T (columns x columns): the layer's own output error is
  tr(dW H dW^T). Its correlations are what error-compensating rounding (kmeans.palettize_output_aware) uses.
- `row_gradient` gamma_r = mean over inputs and positions of g_r^2, g = J^T v the gradient of sum(v * y) for a
  random sign vector v (Rademacher, one per input): E[g g^T] = J^T J, so gamma_r is how strongly an error in
  row r reaches the output. One backward pass gives it for every layer at once; autograd computes no weight
  gradients (only activation gradients flow, read by a hook on each layer's output). A mean over positions
  needs few inputs: the backward pass sees a third of them (GRADIENT_SHARE).

Predicted damage of dW (denoiser-output MSE): sum_r gamma_r (dW H dW^T)_rr / outputs, summed over layers.
The element weights of the weighted k-means are its diagonal: gamma_r H_cc.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecompile.compress.calibration import CalibrationSet
from edgecompile.errors import EdgeCompileError
from edgecompile.model.device import device_of


def as_matrix(mod: nn.Module, weight: torch.Tensor | np.ndarray):
    """The weight as (rows, columns): Conv2d (O, I*kh*kw) in `unfold`'s column order; ConvTranspose2d
    (O*kh*kw, I) (each output tap is its own row)."""
    if isinstance(mod, nn.ConvTranspose2d):
        return weight.reshape(weight.shape[0], -1).T
    return weight.reshape(weight.shape[0], -1)


def from_matrix(mod: nn.Module, matrix, shape: tuple[int, ...]):
    """The inverse of as_matrix."""
    if isinstance(mod, nn.ConvTranspose2d):
        return matrix.T.reshape(shape)
    return matrix.reshape(shape)


def check_supported(mod: nn.Module) -> None:
    kh, kw = mod.weight.shape[2:]
    plain = mod.groups == 1 and tuple(mod.padding) == (0, 0) and tuple(mod.dilation) == (1, 1)
    if not plain or (isinstance(mod, nn.ConvTranspose2d) and tuple(mod.stride) != (kh, kw)):
        raise EdgeCompileError(f"internal: output-aware palettization does not handle this {type(mod).__name__} "
                               f"(groups {mod.groups}, padding {mod.padding}, stride {mod.stride})")


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(columns, positions of every input): what multiplies the weight matrix."""
    kh, kw = mod.weight.shape[2:]
    if isinstance(mod, nn.ConvTranspose2d) or ((kh, kw) == (1, 1) and tuple(mod.stride) == (1, 1)):
        cols = x.flatten(2)  # (B, I, H*W)
    else:
        cols = F.unfold(x, (kh, kw), stride=mod.stride)  # (B, I*kh*kw, positions)
    return cols.transpose(0, 1).flatten(1)


def _row_gradients(mod: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """(rows, positions of every input) of the output gradient, rows as in as_matrix."""
    if isinstance(mod, nn.ConvTranspose2d):
        kh, kw = mod.weight.shape[2:]
        b, o, hh, ww = g.shape
        g = g.reshape(b, o, hh // kh, kh, ww // kw, kw).permute(1, 3, 5, 0, 2, 4)  # (O, a, c, B, H, W)
        return g.reshape(o * kh * kw, -1)
    return g.transpose(0, 1).flatten(1)


@dataclass
class LayerStatistics:
    """Per palettizable layer: `hessian` (columns x columns, float64, summed) and `row_gradient` (rows, mean
    squared output gradient); `output_elements` turns summed damage into a denoiser-output MSE."""

    hessian: dict[str, torch.Tensor]
    row_gradient: dict[str, torch.Tensor]
    output_elements: int
    reference: torch.Tensor  # the unquantized outputs on the calibration inputs (CPU)
    seconds: float = 0.0
    forward_seconds: float = 0.0  # one plain forward pass over the same inputs, in the same run

    @property
    def cost_forward_passes(self) -> float:
        return self.seconds / max(self.forward_seconds, 1e-9)

    def element_weights(self, mod: nn.Module, layer: str) -> np.ndarray:
        """The weighted k-means' weight of every element (weight layout): gamma_r H_cc, floored at FLOOR x mean
        so that no value is ignored."""
        diag = torch.diagonal(self.hessian[layer]).double().cpu()
        w = self.row_gradient[layer].double().cpu()[:, None] * diag[None, :]
        w = from_matrix(mod, w, tuple(mod.weight.shape)).numpy()
        mean = float(w.mean())
        if not np.isfinite(mean) or mean <= 0:  # the output does not depend on this layer on these inputs
            return np.ones_like(w)
        return np.maximum(w, FLOOR * mean)

    def predicted_mse(self, mod: nn.Module, layer: str, delta: torch.Tensor) -> float:
        """The denoiser-output MSE that changing `layer`'s weight by `delta` alone is predicted to cause."""
        h = self.hessian[layer]
        d = as_matrix(mod, delta.to(h.device, torch.float64))
        per_row = ((d @ h) * d).sum(1)  # each row's own output error, tr(dW H dW^T) split by row
        return float((per_row * self.row_gradient[layer].to(per_row.device, torch.float64)).sum()) / self.output_elements


FLOOR = 1e-3
GRADIENT_SHARE = 3  # the backward pass sees every 3rd input: gamma is a mean over rows' positions, and the
# backward of split-einsum attention costs two forward passes (it differentiates both operands of each einsum)
MIN_GRADIENT_INPUTS = 16


def measure_statistics(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet, batch_size: int = 64,
                       seed: int = 0, progress: Callable[[str, int, int], None] | None = None) -> LayerStatistics:
    """A forward pass over every calibration input (hooks accumulate each layer's H; its outputs are the
    reference), then a forward and backward pass over a spread third of them (gamma).

    H and gamma stay on the model's device (float64 sums on a CPU, float32 elsewhere: MPS has no float64)."""
    device = device_of(model)
    acc = torch.float64 if device.type == "cpu" else torch.float32
    for mod in layers.values():
        check_supported(mod)
    hessian: dict[str, torch.Tensor] = {}
    grad_sq: dict[str, torch.Tensor] = {}
    positions = dict.fromkeys(layers, 0)
    captured: list[tuple[str, torch.Tensor]] = []

    def gram_hook(name):
        def hook(mod, inputs, output):
            cols = _columns(mod, inputs[0]).float()
            gram = (cols @ cols.T).to(acc)  # products in float32 (2x the speed), sums across batches in `acc`
            hessian[name] = hessian[name] + gram if name in hessian else gram
        return hook

    def output_hook(name):
        def hook(mod, inputs, output):
            if not output.requires_grad:  # a layer fed only by constants (text, timestep): its output starts the graph
                output = output.detach().requires_grad_()
            captured.append((name, output))
            return output
        return hook

    n_grad = min(len(calib), max(MIN_GRADIENT_INPUTS, len(calib) // GRADIENT_SHARE))
    grad_set = calib.subset(n_grad)
    n_batches = -(-len(calib) // batch_size) + -(-n_grad // batch_size)
    done = 0
    start = time.perf_counter()
    handles = [m.register_forward_hook(gram_hook(n)) for n, m in layers.items()]
    outputs = []
    try:
        with torch.no_grad():
            for x, t, c in calib.batches(batch_size, device):
                outputs.append(model(x, t, c).cpu())
                done += 1
                if progress:
                    progress("layer statistics (a forward pass, then a backward pass on a third)", done, n_batches)
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(seed + 104729)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # no weight gradients: only activation gradients flow
    handles = [m.register_forward_hook(output_hook(n)) for n, m in layers.items()]
    try:
        for x, t, c in grad_set.batches(batch_size, device):
            captured.clear()
            with torch.enable_grad():
                y = model(x, t, c)
                v = (torch.randint(0, 2, y.shape, generator=g).float() * 2 - 1).to(device)  # same signs on every device
                grads = torch.autograd.grad((y.float() * v).sum(), [o for _, o in captured], allow_unused=True)
            for (name, _), grad in zip(captured, grads):
                if grad is None:
                    continue
                rows = _row_gradients(layers[name], grad.detach()).float()
                sq = rows.pow(2).sum(1).to(acc)
                grad_sq[name] = grad_sq[name] + sq if name in grad_sq else sq
                positions[name] += rows.shape[1]
            captured.clear()
            done += 1
            if progress:
                progress("layer statistics (a forward pass, then a backward pass on a third)", done, n_batches)
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        captured.clear()
    seconds = time.perf_counter() - start
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, t, c in calib.batches(batch_size, device):
            model(x, t, c)
    forward_seconds = time.perf_counter() - t0
    reference = torch.cat(outputs)
    row_gradient = {}
    for name, mod in layers.items():
        rows, cols = as_matrix(mod, mod.weight).shape
        row_gradient[name] = grad_sq[name] / max(positions[name], 1) if name in grad_sq else torch.zeros(rows, dtype=acc, device=device)
        if name not in hessian:  # a layer the forward never called
            hessian[name] = torch.zeros(cols, cols, dtype=acc, device=device)
    return LayerStatistics(hessian=hessian, row_gradient=row_gradient, output_elements=reference.numel(), reference=reference,
                           seconds=seconds, forward_seconds=forward_seconds)

"""What each layer's weight error costs at the denoiser's output, measured on calibration inputs in one forward
pass and a backward pass over a third of them: the statistics behind edgecompile's output-aware palettes and its
`propagated` sweep.

Every palettizable layer is a linear map from columns (input channels x kernel taps, per group of a grouped
conv) to rows (output channels; times kernel taps for the transposed conv), `as_matrix`. A weight change dW
changes the layer's output at one position by dW x and the denoiser's output by J (dW x). Two statistics:

- `hessian` H = sum over inputs and positions of x x^T (columns x columns, one block per group): the layer's own
  output error is tr(dW H dW^T). Its correlations are what error-compensating rounding (rounding.py) uses.
- `fisher` F (the weight's matrix shape): the diagonal Fisher (Gauss-Newton) information of the output,
  F_rc = sum over inputs of (d<v, y>/dW_rc)^2 for a random sign vector v (Rademacher, one per input):
  E[v v^T] = I, so F_rc estimates sum over outputs of (dy/dW_rc)^2, without labels. Each input's weight
  gradient is formed from the layer's own input and output gradient (sum over positions of g x^T), so
  autograd computes no weight gradients and errors that add up across positions (attention averaging values,
  a timestep embedding broadcast to every position) count as they do at the output. It is what SqueezeLLM's
  sensitive k-means (coremltools' SKMPalettizer) weights by, and the weighted k-means' element weights.

Predicted damage of one layer's dW (denoiser-output MSE): per row, the diagonal-Fisher damage sum_c F_rc dW_rc^2
times how the row's errors cancel or add through its input correlations, (dW_r H dW_r^T) / sum_c H_cc dW_rc^2
(1 for independent errors; below 1 for error-compensating indices).
"""
from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecompile.compress.hooks import forward_hooks
from edgecompile.compress.calibration import CalibrationSet
from edgecompile.errors import EdgeCompileError
from edgecompile.model.device import device_of, release_freed_host_memory


def statistics_bytes(layers: dict[str, nn.Module]) -> int:
    """At most what measure_statistics holds for `layers` (meta-device layers will do): F as large as the float32
    weights, and H as if no two layers shared an input (q, k and v share theirs, so it is less)."""
    total = 0
    for mod in layers.values():
        rows, cols = as_matrix(mod, mod.weight).shape  # columns of one group
        total += 4 * (rows * cols + groups_of(mod) * cols**2)
    return total


def statistics_groups(layers: dict[str, nn.Module], count: int) -> list[list[str]]:
    """`layers` (in the model's order) cut into `count` runs of about equal statistics (statistics_bytes), measured one
    run at a time (compress/palettize_model.prepare_in_groups): a run's statistics are let go before the next is
    measured. A cut falls only between modules, never inside one: q, k and v of one attention read one input, whose
    H is summed once. Fewer runs where there are fewer modules."""
    units: dict[str, list[str]] = {}
    for name in layers:
        units.setdefault(name.rpartition(".")[0] or name, []).append(name)  # a top-level layer is a module of its own
    sizes = [statistics_bytes({n: layers[n] for n in names}) for names in units.values()]
    share = max(sum(sizes), 1) / max(count, 1)
    groups: list[list[str]] = [[] for _ in range(max(count, 1))]
    before = 0
    for names, size in zip(units.values(), sizes):  # each module to the run its middle byte falls in
        groups[min(len(groups) - 1, int((before + size / 2) // share))] += names
        before += size
    return [g for g in groups if g]


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
    if isinstance(mod, nn.ConvTranspose2d) and (mod.groups != 1 or tuple(mod.stride) != (kh, kw) or tuple(mod.padding) != (0, 0)):
        raise EdgeCompileError(f"internal: output-aware palettization does not handle this ConvTranspose2d "
                               f"(groups {mod.groups}, padding {mod.padding}, stride {mod.stride})")


def groups_of(mod: nn.Module) -> int:
    """Groups of a grouped (e.g. depthwise) conv: its rows and columns split into this many independent blocks."""
    return 1 if isinstance(mod, nn.ConvTranspose2d) else mod.groups


def _columns_per_input(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(inputs, groups, columns, positions): what multiplies each group's block of the weight matrix."""
    kh, kw = mod.weight.shape[2:]
    if isinstance(mod, nn.ConvTranspose2d) or ((kh, kw) == (1, 1) and tuple(mod.stride) == (1, 1) and tuple(mod.padding) == (0, 0)):
        cols = x.flatten(2)  # (B, I, H*W)
    else:  # (B, I*kh*kw, positions), channel-major like the weight's (I/groups, kh, kw)
        cols = F.unfold(x, (kh, kw), dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    return cols.reshape(cols.shape[0], groups_of(mod), -1, cols.shape[-1])


def column_layout(mod: nn.Module) -> tuple:
    """What turns a layer's input into its matrix's columns: two layers with equal layouts reading one input tensor
    have equal H."""
    transpose = isinstance(mod, nn.ConvTranspose2d)
    return (transpose, groups_of(mod)) if transpose else (tuple(mod.weight.shape[1:]), mod.stride, mod.padding, mod.dilation, mod.groups)


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(groups, columns, positions of every input)."""
    return _columns_per_input(mod, x).permute(1, 2, 0, 3).flatten(2)


class SecondMoment:
    """H = sum of x x^T of one layer input, (groups, columns, columns): held as the columns themselves, X
    (groups, columns, n) with H = X X^T, while they are fewer than H's columns, as H once they are not.

    Why: at the paper's width 0.5 with 8 calibration inputs at 32x32, 146 of 268 layers see fewer positions than
    they have columns (the middle stage's 3072-column layers see 512): X is then smaller than H, a row's quadratic
    form d H d^T = |d X|^2 costs n / columns of the product with H (the sweep's scoring, 3.65 TFLOP with H, 1.65
    with X), and H is formed only where rounding factors it."""

    def __init__(self, columns: torch.Tensor | None = None, gram: torch.Tensor | None = None):
        self.columns, self.gram = columns, gram  # exactly one is set; float32

    @classmethod
    def of(cls, cols: torch.Tensor) -> SecondMoment:
        """One batch's moment from its (groups, columns, positions); kept columns are copied (they may be a view of
        an activation the model goes on to use)."""
        if cols.shape[2] >= cols.shape[1]:
            return cls(gram=cols @ cols.transpose(1, 2))
        return cls(columns=cols.clone(memory_format=torch.contiguous_format))

    def compacted(self) -> SecondMoment:
        if self.columns is not None and self.columns.shape[2] >= self.columns.shape[1]:
            self.columns, self.gram = None, self.columns @ self.columns.transpose(1, 2)
        return self

    def __len__(self) -> int:
        return len(self.columns if self.columns is not None else self.gram)

    @property
    def device(self) -> torch.device:
        return (self.columns if self.columns is not None else self.gram).device

    @property
    def size(self) -> int:
        """Columns of H."""
        return (self.columns if self.columns is not None else self.gram).shape[1]

    def __add__(self, other: SecondMoment) -> SecondMoment:
        if self.columns is not None and other.columns is not None:
            return SecondMoment(columns=torch.cat([self.columns, other.columns], dim=2)).compacted()
        return SecondMoment(gram=self.matrix() + other.matrix())

    def add_(self, other: SecondMoment) -> SecondMoment:
        """In place (the object every layer reading this input holds)."""
        total = self + other
        self.columns, self.gram = total.columns, total.gram
        return self

    def matrix(self, group: int | None = None) -> torch.Tensor:
        """H (groups, columns, columns), or one group's (columns, columns)."""
        if self.gram is not None:
            return self.gram if group is None else self.gram[group]
        x = self.columns if group is None else self.columns[group]
        return x @ x.transpose(-1, -2)

    def diagonal(self) -> torch.Tensor:
        """(groups, columns): H's diagonal."""
        return torch.diagonal(self.gram, dim1=1, dim2=2) if self.gram is not None else self.columns.pow(2).sum(2)

    def quadratic_rows(self, d: torch.Tensor) -> torch.Tensor:
        """(groups, rows): d_r H d_r^T of each row of d (groups, rows, columns)."""
        if self.gram is not None:
            return ((d @ self.gram) * d).sum(2)
        return (d @ self.columns).pow(2).sum(2)


def _row_gradients_per_input(mod: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """(inputs, rows, positions) of the output gradient, rows as in as_matrix."""
    if isinstance(mod, nn.ConvTranspose2d):
        kh, kw = mod.weight.shape[2:]
        b, o, hh, ww = g.shape
        g = g.reshape(b, o, hh // kh, kh, ww // kw, kw).permute(0, 1, 3, 5, 2, 4)  # (B, O, a, c, H, W)
        return g.reshape(b, o * kh * kw, -1)
    return g.flatten(2)


def per_input_weight_gradient(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(inputs, rows, columns): each input's gradient of <g, layer(x)> in the weight matrix, sum over positions
    of g x^T within each group."""
    cols = _columns_per_input(mod, x)  # (B, G, c, P)
    rows = _row_gradients_per_input(mod, g)  # (B, R, P)
    b, groups = cols.shape[:2]
    rows = rows.reshape(b, groups, -1, rows.shape[-1])  # (B, G, R/G, P)
    return (rows @ cols.transpose(2, 3)).reshape(b, -1, cols.shape[2])


@dataclass
class LayerStatistics:
    """Per palettizable layer: `hessian` (groups x columns x columns, summed; one block per group of a grouped
    conv) and `fisher` (rows x columns, summed over the inputs of the backward pass, scaled to all inputs);
    `output_elements` turns summed damage into a denoiser-output MSE."""

    hessian: dict[str, SecondMoment]  # layers reading one input hold one object
    fisher: dict[str, torch.Tensor]
    output_elements: int
    reference: torch.Tensor  # the unquantized outputs on the calibration inputs (CPU)
    seconds: float = 0.0
    forward_seconds: float = 0.0  # one plain forward pass over the same inputs, in the same run

    @property
    def cost_forward_passes(self) -> float:
        return self.seconds / max(self.forward_seconds, 1e-9)

    def element_weights(self, mod: nn.Module, layer: str) -> np.ndarray:
        """The weighted k-means' weight of every element (weight layout): its diagonal Fisher information,
        floored at FLOOR x the layer's mean so that no value is ignored."""
        w = from_matrix(mod, self.fisher[layer].double().cpu(), tuple(mod.weight.shape)).numpy()
        mean = float(w.mean())
        if not np.isfinite(mean) or mean <= 0:  # the output does not depend on this layer on these inputs
            return np.ones_like(w)
        return np.maximum(w, FLOOR * mean)

    def predicted_mse(self, mod: nn.Module, layer: str, delta: torch.Tensor) -> float:
        """The denoiser-output MSE that changing `layer`'s weight by `delta` alone is predicted to cause."""
        return self.predicted_mses(mod, layer, [delta])[0]

    def predicted_mses(self, mod: nn.Module, layer: str, deltas: list[torch.Tensor]) -> list[float]:
        """`predicted_mse` of each of `deltas` (a layer's candidate bit-widths), their rows scored in one product
        with H: the products dominate a paper-scale sweep's scoring, and one taller product runs faster than several."""
        # Scored in float32, as H is summed (float64 doubled the products' time): the ratio of two quadratic forms of
        # one delta, each summed per row, does not depend on H's scale; the damages are summed in float64
        h = self.hessian[layer]
        fisher = self.fisher[layer].to(h.device, torch.float32)
        d = torch.stack([as_matrix(mod, delta.to(h.device, torch.float32)) for delta in deltas])  # (deltas, rows, columns)
        fisher_damage = (fisher * d * d).sum(2).double()  # (deltas, rows)
        n, rows, cols = d.shape
        d = d.reshape(n, len(h), rows // len(h), cols).transpose(0, 1).reshape(len(h), -1, cols)  # (groups, deltas x rows of the group, columns)
        correlated = h.quadratic_rows(d)  # each row's own output error, tr(dW H dW^T) split by row
        independent = (d * d * h.diagonal()[:, None, :]).sum(2)  # without correlations
        correlated, independent = (x.reshape(len(h), n, -1).transpose(0, 1).reshape(n, rows).double() for x in (correlated, independent))
        ratio = torch.where(independent > 0, correlated / independent.clamp_min(1e-300), torch.ones_like(correlated))
        return [float(v) / self.output_elements for v in (fisher_damage * ratio).sum(1)]


FLOOR = 1e-3
TIMED_INPUTS = 8  # a plain forward pass is timed on this many inputs and scaled to the set ...
SCALED_ABOVE_SECONDS = 2.0  # ... when they take this long: below it per-call overhead, not arithmetic, dominates


def _timed_pass(model: nn.Module, calib: CalibrationSet, batch_size: int) -> float:
    device = device_of(model)
    start = time.perf_counter()
    with torch.no_grad():
        for x, t, c in calib.batches(batch_size, device):
            model(x, t, c)
    return time.perf_counter() - start


def plain_forward_seconds(model: nn.Module, calib: CalibrationSet, batch_size: int = 64) -> float:
    """Seconds of one plain forward pass over `calib`, the unit a sweep's cost is counted in. Timed on
    TIMED_INPUTS spread inputs and scaled by the set's size where those take SCALED_ABOVE_SECONDS or more (the
    pass is bound by arithmetic, which scales with the inputs); over the whole set otherwise, where per-call overhead
    would make a scaled figure too large. A pass over the whole set only to time it was 42 s of the statistics'
    184 s at the paper's width 0.375 (58 inputs); the scaled figure there was 37.5 s, if anything overstating the
    sweep's cost in passes."""
    timed = calib.subset(min(TIMED_INPUTS, batch_size))
    seconds = _timed_pass(model, timed, batch_size)
    if len(timed) == len(calib) or seconds < SCALED_ABOVE_SECONDS:
        return seconds if len(timed) == len(calib) else _timed_pass(model, calib, batch_size)
    return seconds * len(calib) / len(timed)

GRADIENT_SHARE = 3  # the backward pass sees every 3rd input: the backward of split-einsum attention costs two
# forward passes (it differentiates both operands of each einsum), and a few dozen inputs estimate F well
MIN_GRADIENT_INPUTS = 16
GRADIENT_BATCH = 4  # the backward pass's batch, at most: it keeps every activation of the batch. At the paper's
# width 0.375 (58 inputs at 32x32) batches of 2, 4, 8 and 19 took 103, 98, 101 and 116 s at statistics peaks of 5.6,
# 6.8, 8.8 and 13.4 GiB, about 0.46 GiB an input (benchmarks/statistics_memory.py): smaller batches lose no speed
# on a CPU, whose products are large enough at one input


def measure_statistics(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet, batch_size: int = 64,
                       seed: int = 0, progress: Callable[[str, int, int], None] | None = None,
                       gradient_batch_size: int | None = None, forward_seconds: float | None = None) -> LayerStatistics:
    """A forward and backward pass over a spread third of the calibration inputs (F, and H), and a forward pass over
    the others (H): hooks accumulate each layer's H over every input, and the outputs are the reference.

    `batch_size` batches the forward-only pass; `gradient_batch_size` (default: GRADIENT_BATCH, or `batch_size` if
    smaller) the backward pass, which keeps every activation of its batch (model/budget.py: gradient_batch_for
    sizes it to the free memory). `forward_seconds`: a plain forward pass's time already measured on this model and
    set (a later group of layers, compress/palettize_model.prepare_in_groups), else measured here.

    The statistics of a layer do not depend on which other layers are measured with it: the same inputs, batches
    and random signs give the same F and H whether `layers` is every layer or a group of them.

    H and F stay on the model's device, in float32. H's terms are float32 products (2x the speed of float64's), so
    summing a few batches of them in float64 added no digits that mattered; it cost 1.5 GiB and 5 s at the paper's
    width 0.5. rounding.py factors H in float64 on a CPU, where a nearly singular sum needs the digits. F is a sum of
    squares: it only weights k-means and scales predicted damage, and it is as large as the weights themselves."""
    device = device_of(model)
    for mod in layers.values():
        check_supported(mod)
    hessian: dict[str, SecondMoment] = {}
    fisher: dict[str, torch.Tensor] = {}
    captured: list[tuple[str, list[torch.Tensor], torch.Tensor]] = []  # (layer, [its input until used], output)
    # Layers that read one input tensor (q, k and v; the text K and V of every block; a gated FFN's two inputs)
    # have one H: it is computed once per batch and held once, the layers' entries the same tensor.
    grams: dict[tuple, tuple[weakref.ref, SecondMoment, int]] = {}  # this batch's: (input, column layout) -> its moment
    made: dict[int, weakref.ref] = {}  # this batch's grams by id, to tell a gram from an accumulator
    added: set[tuple[int, int]] = set()  # (accumulator, gram) pairs summed this batch: a shared H takes each gram once
    touched: dict[str, list[int]] = {}  # the grams each layer read this batch, checked equal across an H's layers
    tokens = itertools.count()

    def gram_hook(name):
        def hook(mod, inputs, output):
            x = inputs[0]
            key = (id(x), column_layout(mod))
            hit = grams.get(key)
            if hit is not None and hit[0]() is x:
                _, gram, token = hit
            else:
                with torch.no_grad():  # in the backward pass's forward too: H is no part of the gradient
                    gram, token = SecondMoment.of(_columns(mod, x.detach()).float()), next(tokens)
                grams[key] = (weakref.ref(x), gram, token)
                made[id(gram)] = weakref.ref(gram)
                weakref.finalize(x, grams.pop, key, None)  # held only while its input lives: one batch's H is not held twice
            touched.setdefault(name, []).append(token)
            h = hessian.get(name)
            if h is None:
                hessian[name] = gram  # by reference: every layer reading this input shares it
            elif (ref := made.get(id(h))) is not None and ref() is h:  # h is a gram of this batch, which other layers
                hessian[name] = h + gram  # may still read: a layer called again in its first batch (strips) sums anew
            elif (id(h), token) not in added:
                added.add((id(h), token))
                h.add_(gram)
        return hook

    def end_of_batch() -> None:
        owners: dict[int, str] = {}
        for name, h in hessian.items():
            first = owners.setdefault(id(h), name)
            if touched.get(first) != touched.get(name):
                raise EdgeCompileError(f"internal: layers {first} and {name} share input statistics but read different inputs")
        grams.clear()
        made.clear()
        added.clear()
        touched.clear()

    # The backward pass turns each layer's output gradient into its per-input weight gradients as autograd produces
    # it (a tensor hook), and drops that call's input right after: no gradient of every layer is held at once, which
    # at the paper's width 0.5 was 4.3 GiB of transient memory on top of the statistics.
    calls: dict[str, int] = {}  # a layer's calls this batch whose output gradient has not arrived yet
    per_input: dict[str, torch.Tensor] = {}  # a layer called more than once (strips) sums its calls before squaring

    def settle(name: str) -> None:
        sq = per_input.pop(name).square_().sum(0)  # in place: a fresh (inputs, rows, columns) buffer cost 4.4 s at paper scale
        fisher[name] = fisher[name] + sq if name in fisher else sq

    def output_hook(name):
        def hook(mod, inputs, output):
            if not output.requires_grad:  # a layer fed only by constants (text, timestep): its output starts the graph
                output = output.detach().requires_grad_()
            held = [inputs[0].detach()]
            calls[name] = calls.get(name, 0) + 1

            def on_gradient(grad):
                w_grad = per_input_weight_gradient(layers[name], held.pop().float(), grad.detach().float())
                per_input[name] = per_input[name] + w_grad if name in per_input else w_grad
                calls[name] -= 1
                if calls[name] == 0:
                    settle(name)

            output.register_hook(on_gradient)
            captured.append((name, held, output))
            return output
        return hook

    n_grad = min(len(calib), max(MIN_GRADIENT_INPUTS, len(calib) // GRADIENT_SHARE))
    in_grad = torch.zeros(len(calib), dtype=torch.bool)
    in_grad[calib.spread(n_grad)] = True
    # The backward pass's forward also sums H (a forward-only pass over the same inputs cost one pass of the
    # calibration set when the backward saw them all): the forward-only pass covers the other inputs
    grad_idx, rest_idx = in_grad.nonzero()[:, 0], (~in_grad).nonzero()[:, 0]
    grad_set, rest = calib.take(grad_idx), calib.take(rest_idx)
    gradient_batch_size = gradient_batch_size or min(batch_size, GRADIENT_BATCH)
    n_batches = -(-len(rest) // batch_size) + -(-n_grad // gradient_batch_size)
    what = "layer statistics (a forward and backward pass on a third, a forward pass on the rest)"
    done = 0
    start = time.perf_counter()
    outputs = []
    with forward_hooks(layers, gram_hook), torch.no_grad():
        for x, t, c in rest.batches(batch_size, device):
            outputs.append(model(x, t, c).cpu())
            end_of_batch()
            done += 1
            if progress:
                progress(what, done, n_batches)
    g = torch.Generator().manual_seed(seed + 104729)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # no weight gradients: only activation gradients flow
    try:
        with forward_hooks(layers, gram_hook), forward_hooks(layers, output_hook):
            for x, t, c in grad_set.batches(gradient_batch_size, device):
                captured.clear()
                calls.clear()
                with torch.enable_grad():
                    y = model(x, t, c)
                    outputs.append(y.detach().cpu())
                    end_of_batch()
                    v = (torch.randint(0, 2, y.shape, generator=g).float() * 2 - 1).to(device)  # same signs on every device
                    leaves = [o for _, _, o in captured if o.is_leaf]  # the constant-fed layers' outputs start the graph
                    torch.autograd.backward((y.float() * v).sum(), inputs=leaves or None)
                del y, v
                for o in leaves:
                    o.grad = None
                for name in list(per_input):  # some calls' outputs did not reach the loss: their sums are complete
                    settle(name)
                captured.clear()
                release_freed_host_memory()
                done += 1
                if progress:
                    progress(what, done, n_batches)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        captured.clear()
    seconds = time.perf_counter() - start
    if forward_seconds is None:
        forward_seconds = plain_forward_seconds(model, calib, batch_size)
    reference = torch.empty((len(calib), *outputs[0].shape[1:]), dtype=outputs[0].dtype)
    reference[torch.cat([rest_idx, grad_idx])] = torch.cat(outputs)  # back in calibration order
    for name, mod in layers.items():
        rows, cols = as_matrix(mod, mod.weight).shape
        fisher[name] = fisher[name] * (len(calib) / n_grad) if name in fisher else torch.zeros(rows, cols, device=device)
        if name not in hessian:  # a layer the forward never called
            hessian[name] = SecondMoment(columns=torch.zeros(groups_of(mod), cols, 0, device=device))
    return LayerStatistics(hessian=hessian, fisher=fisher, output_elements=reference.numel(), reference=reference,
                           seconds=seconds, forward_seconds=forward_seconds)

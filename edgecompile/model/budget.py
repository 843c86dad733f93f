"""Memory a config needs, estimated before any work, so that an absurd size is refused with a figure instead of
swapping or being killed minutes later.

The estimates are lower bounds (the largest activation of one fp32 forward pass at batch 1, held twice, as a
softmax or an FFN holds its input and output; the fp32 weights of a new model): a size is refused only when even
the lower bound cannot fit the memory this machine has available.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from edgecompile.errors import EdgeCompileError
from edgecompile.model.config import ModelConfig

FP32 = 4


@dataclass(frozen=True)
class Estimate:
    bytes: int
    largest: str  # which tensor dominates


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation now (Linux MemAvailable; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def forward_activation_bytes(config: ModelConfig, width: float, latent_hw: tuple[int, int], batch: int = 1) -> Estimate:
    """Lower bound of one forward pass's peak activation memory (fp32)."""
    d = config.dims(width)
    h, w = config.token_grid(*latent_hw)
    n = h * w
    mh, mw = config.middle_grid(*latent_hw)
    nm = mh * mw
    outer = config.depth_down + config.depth_up > 0
    tensors = {"middle FFN hidden": nm * d.ffn_middle, "cross-attention scores": d.heads * max(n, nm) * config.text_len}
    if config.depth_middle:
        tensors["middle attention scores"] = d.heads * nm * nm
    if outer:
        tensors["down/up FFN hidden"] = n * d.ffn_outer
        if config.down_up_attention == "full":
            tensors["down/up attention scores"] = d.heads * n * n
        else:
            s = config.kv_compression
            neighbours = (2 * config.bna_radius + 1) ** (2 if config.bna_tiling == "grid" else 1)
            tensors["down/up global attention scores"] = d.heads * n * max(n // (s * s), 1)
            tensors["down/up BNA scores"] = d.heads * n * min(n, neighbours * max(n // config.bna_blocks, 1))
    largest = max(tensors, key=tensors.get)
    return Estimate(bytes=2 * batch * FP32 * tensors[largest], largest=largest)


def training_activation_bytes(config: ModelConfig, width: float, latent_hw: tuple[int, int], batch: int = 1,
                              checkpointed: bool = False) -> int:
    """Rough size of what one training step keeps for its backward pass (fp32): per block about a dozen hidden-size
    maps, each attention's scores and probabilities, and the FFN's hidden and activation. With activation
    checkpointing only each block's input is kept, plus one block's internals while it is recomputed."""
    d = config.dims(width)
    h, w = config.token_grid(*latent_hw)
    n = h * w
    mh, mw = config.middle_grid(*latent_hw)
    nm = mh * mw
    hidden_maps = 12

    def block(tokens: int, self_keys: int, ffn: int) -> int:
        return tokens * (hidden_maps * d.hidden + 2 * d.heads * (self_keys + config.text_len) + 2 * ffn)

    if config.down_up_attention == "full":
        outer_keys = n
    else:
        neighbours = (2 * config.bna_radius + 1) ** (2 if config.bna_tiling == "grid" else 1)
        outer_keys = min(n, neighbours * max(n // config.bna_blocks, 1)) + max(n // config.kv_compression**2, 1)
    blocks = ([block(n, outer_keys, d.ffn_outer)] * (config.depth_down + config.depth_up)
              + [block(nm, nm, d.ffn_middle)] * config.depth_middle)
    if not blocks:
        return 0
    if checkpointed:
        kept = (config.depth_down + config.depth_up) * n * d.hidden + config.depth_middle * 2 * nm * d.hidden + max(blocks)
    else:
        kept = sum(blocks)
    return batch * FP32 * kept


MAX_BATCH = 64  # the largest inference batch edgecompile uses (its default before batches were sized)
MEMORY_SHARE = 0.5  # of the free memory, for one batch's activations (weights, teacher outputs and slack need the rest)
# forward_activation_bytes is a lower bound (the largest tensor, held twice); other tensors are alive at that moment
# too. A margin, not a measurement: at paper scale it is unmeasured, and --batch-size overrides the result.
ACTIVATION_MARGIN = 4


def _batch_fitting(per_sample_bytes: int, free_bytes: int | None, cap: int) -> int:
    """The largest batch whose per-sample bytes fit MEMORY_SHARE of `free_bytes` (at least 1, at most cap)."""
    if free_bytes is None:
        return cap
    return max(1, min(cap, int(free_bytes * MEMORY_SHARE // max(per_sample_bytes, 1))))


# On the CPU a larger inference batch buys no speed once one batch's activations are large: at the paper's width 1.0
# at 32x32, a pass over 46 inputs took 144.9 s in one batch of 46 (3.42 GiB beside the weights) and 93.5 s in
# batches of 16 (1.25 GiB; benchmarks/inference_batch_memory.py), and the larger batch set the width's export peak.
CPU_BATCH_ABOVE_BYTES = 2**30


def batch_size_for(config: ModelConfig, width: float, latent_hw: tuple[int, int], free_bytes: int | None,
                   cap: int = MAX_BATCH, on_cpu: bool = False) -> int:
    """The largest inference batch whose activations fit MEMORY_SHARE of `free_bytes` (at least 1, at most cap); on
    the CPU also at most what keeps one batch's estimated activations under CPU_BATCH_ABOVE_BYTES."""
    per_input = ACTIVATION_MARGIN * forward_activation_bytes(config, width, latent_hw, 1).bytes
    if on_cpu:
        cap = max(1, min(cap, CPU_BATCH_ABOVE_BYTES // per_input))
    return _batch_fitting(per_input, free_bytes, cap)


# On the CPU, checkpointing pays where the activations are large: allocating them costs more than recomputing
# (benchmarks/distill_memory.py, toy width 1.0 at 32x32, batch 8, 4.7 GiB estimated: 0.66x the step time); on small
# ones it only recomputes (the bundled model at 8x8, batch 16: 1.4x the distillation time, issue 29).
CPU_CHECKPOINT_ABOVE_BYTES = 2**30


def training_batch_for(config: ModelConfig, width: float, latent_hw: tuple[int, int], free_bytes: int | None,
                       cap: int, on_cpu: bool = False) -> tuple[int, bool]:
    """(training batch, activation checkpointing): the largest batch up to `cap` whose kept activations fit
    MEMORY_SHARE of `free_bytes`; checkpointing where it pays: on the CPU when the batch's activations would pass
    CPU_CHECKPOINT_ABOVE_BYTES, elsewhere where the batch would otherwise be smaller than the one it allows."""
    def fits(checkpointed: bool) -> int:
        return _batch_fitting(training_activation_bytes(config, width, latent_hw, 1, checkpointed), free_bytes, cap)

    plain, checkpointed = fits(False), fits(True)
    if on_cpu:
        small = training_activation_bytes(config, width, latent_hw, plain, False) <= CPU_CHECKPOINT_ABOVE_BYTES
        return (plain, False) if small and plain >= checkpointed else (checkpointed, True)
    return (checkpointed, True) if checkpointed > plain else (plain, False)


def statistics_batches_for(config: ModelConfig, width: float, latent_hw: tuple[int, int], free_bytes: int | None, held_bytes: int,
                           forward_cap: int, gradient_cap: int) -> tuple[int, int]:
    """(forward-only batch, backward batch) of the layer statistics (compress/importance.py): what fits MEMORY_SHARE of
    the memory left once their own sums are held (`held_bytes`: F and H, as large as the weights and more). At the
    paper's width 1.0 those are 11 GiB: batches sized from the free memory alone, 64 and 4, were killed at 24.4 GiB
    on a 24 GiB machine, and 8 and 1 peaked at 21.2 (benchmarks/statistics_memory.py)."""
    left = None if free_bytes is None else max(free_bytes - held_bytes, 0)
    per_input = STATISTICS_MARGIN * ACTIVATION_MARGIN * forward_activation_bytes(config, width, latent_hw, 1).bytes
    return _batch_fitting(per_input, left, forward_cap), gradient_batch_for(config, width, latent_hw, left, gradient_cap)


STATISTICS_SHARE = 0.25  # of the free memory, for the layer statistics' sums (F and H) of one group of layers: the
# palettes made from them (a byte a weight and candidate), the backward pass's activations and, in the sweep, a decoded
# layer at a time come on top. At the paper's width 1.0 (13.8 GiB at most, 16.5 GiB free beside its weights) this is 4
# groups; widths 0.375 and 0.5 (3.5 and 4.9 GiB) stay one.


def statistics_groups_for(held_bytes: int, free_bytes: int | None) -> int:
    """How many groups of layers the layer statistics are measured in, each a pass over the calibration inputs
    (compress/palettize_model.prepare_in_groups): one where all their sums (`held_bytes`, importance.statistics_bytes)
    fit STATISTICS_SHARE of `free_bytes`, else as few as bring each group's under it."""
    if free_bytes is None:
        return 1
    return max(1, math.ceil(held_bytes / max(free_bytes * STATISTICS_SHARE, 1)))


STATISTICS_MARGIN = 6  # a forward batch of the statistics held 0.22-0.33 GiB an input at the paper's width 1.0 (its sums
# of x x^T grow with it), 3.7-5.7x ACTIVATION_MARGIN x forward_activation_bytes


def gradient_batch_for(config: ModelConfig, width: float, latent_hw: tuple[int, int], free_bytes: int | None, cap: int) -> int:
    """The layer statistics' backward batch (compress/importance.py): the largest up to `cap` whose activations fit
    MEMORY_SHARE of `free_bytes`. It keeps every activation and, per layer in turn, each input's weight gradient:
    measured at 0.46 GiB per input at the paper's width 0.375 at 32x32 (benchmarks/statistics_memory.py), 2.1x
    training_activation_bytes' 0.22."""
    return _batch_fitting(GRADIENT_MARGIN * training_activation_bytes(config, width, latent_hw, 1, False), free_bytes, cap)


GRADIENT_MARGIN = 3  # measured 2.1x the estimate (gradient_batch_for), with room


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(config: ModelConfig, width: float, latent_hw: tuple[int, int], what: str, batch: int = 1,
               available: int | None = None) -> Estimate:
    """Refuse, before work, a latent size whose forward pass cannot fit in memory."""
    est = forward_activation_bytes(config, width, latent_hw, batch)
    avail = available if available is not None else available_memory_bytes()
    if avail is not None and est.bytes > avail:
        raise EdgeCompileError(
            f"{what}: one forward pass of width {width:g} at latent {latent_hw[0]}x{latent_hw[1]} needs at least {_gib(est.bytes)} "
            f"({est.largest}), and this machine has {_gib(avail)} available: use a smaller latent"
        )
    return est


def check_weights_fit(n_params: int, bytes_per_param: int, what: str, available: int | None = None) -> None:
    """Refuse to allocate a model whose weights alone exceed the available memory (e.g. `init` of a huge config)."""
    need = n_params * bytes_per_param
    avail = available if available is not None else available_memory_bytes()
    if avail is not None and need > avail:
        raise EdgeCompileError(f"{what}: {n_params / 1e9:,.1f}B parameters need {_gib(need)}, and this machine has {_gib(avail)} "
                               "available: use a smaller config")


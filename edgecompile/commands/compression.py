"""The export's compress step for one width: calibrate -> layer statistics -> sweep (or --recipe) -> palettize ->
self-distill, on deploy graphs at the calibration latent on the chosen device. It palettizes the export graph in
place and returns a `CompressionResult` (what was done and measured); `run_sweep` shares its first half.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from edgecompile.choices import KEEP_FP16, Bits, PaletteMethod, SweepMode
from edgecompile.compress.calibration import CalibrationSet, check_finite, default_calibration
from edgecompile.compress.distill import DistillSettings, distill, load_trained_state, trained_state
from edgecompile.compress.importance import GRADIENT_BATCH, statistics_bytes, statistics_groups
from edgecompile.compress.palettize_model import PaletteCache, apply_palettes, layer_shapes, palettes_for, palettizable_layers, prepare_in_groups, uniform_bits
from edgecompile.compress.recipe import Recipe, make_recipe
from edgecompile.compress.sensitivity import PropagatedScores, calibration_outputs, output_psnr, propagated_scores
from edgecompile.deploy.dit import DeployDiT
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.export_report import CompressionResult
from edgecompile.model.budget import MAX_BATCH, available_memory_bytes, batch_size_for, statistics_batches_for, statistics_groups_for, training_batch_for
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.device import free_memory_bytes, peak_memory_gib, release_freed_host_memory, reset_peak_memory

from edgecompile.commands.options import CompressionOptions, ResolvedCompression, SweepSettings

Progress = Callable[[str, int, int], None]
HELD_OUT_FRACTION = 0.2


@dataclass
class StageTimer:
    """Wall time and peak memory of each stage (report.json: stage_seconds, stage_peak_memory_gib)."""

    seconds: dict[str, float] = field(default_factory=dict)
    on_stage: Callable[[str], None] | None = None
    device: torch.device = torch.device("cpu")
    peak_memory_gib: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        if self.on_stage:
            self.on_stage(name)
        reset_peak_memory(self.device)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
        self.peak_memory_gib[name] = peak_memory_gib(self.device)


def calibration_for(ckpt: Checkpoint, width: float, given: CalibrationSet | None, latent_hw: tuple[int, int] | None = None,
                    device: torch.device | str = "cpu", progress: Progress | None = None) -> CalibrationSet:
    calib = given if given is not None else default_calibration(ckpt, width, latent_hw, device=device, progress=progress)
    check_finite(calib, "calibration set")
    return calib


def graph_at_calibration_size(dense, calib: CalibrationSet, query_chunk: int | None = None,
                              device: torch.device | str = "cpu") -> DeployDiT:
    """Sweep and distillation run on deploy graphs at the calibration latent size, on `device`, with batched
    attention (never converted); palettes and distilled parameters carry over to the export graph (on the CPU, for
    conversion) by layer name."""
    return deploy_model(dense, latent_hw=calib.latent_hw, query_chunk=query_chunk).fuse_attention().to(device)


def palette_cache(teacher: DeployDiT, calib: CalibrationSet, method: PaletteMethod, group_size: int | None, sweep_mode: SweepMode | None,
                  needed: dict[str, list[int]], batches: BatchPlan,
                  progress: Progress | None = None) -> tuple[PaletteCache, PropagatedScores | None]:
    """The palettes of `teacher`'s layers (`needed`: {layer: bit-widths} the export may use) and, for the propagated
    sweep (`sweep_mode`), its scores. Where the palette method or the sweep needs the layer statistics (a forward and
    backward pass on a third of the calibration inputs, a forward pass on the rest), they are measured in
    `batches.statistics_groups` groups of layers, each let go once its palettes are made and its layers scored;
    plain palettes without the propagated sweep are made when asked for."""
    cache = PaletteCache(teacher, group_size, method)
    groups = statistics_groups({n: cache.layers[n] for n in needed}, batches.statistics_groups)
    if sweep_mode == SweepMode.PROPAGATED:
        candidates = sorted({b for bits in needed.values() for b in bits})
        return cache, propagated_scores(teacher, calib, cache, candidates, groups, batches.statistics, batches.gradient, progress)
    if method != PaletteMethod.PLAIN:
        prepare_in_groups(cache, teacher, calib, needed, groups, batches.statistics, batches.gradient, progress=progress)
    return cache, None


def sweep_recipe(teacher: DeployDiT, config_name: str, width: float, calib: CalibrationSet, settings: SweepSettings,
                 cache: PaletteCache, progress: Progress | None = None, batch_size: int = MAX_BATCH,
                 scores: PropagatedScores | None = None) -> Recipe:
    return make_recipe(teacher, config_name, width, calib, list(settings.candidates), settings.mode, settings.target_bits,
                       settings.target_psnr_db, cache=cache, progress=progress, batch_size=batch_size, scores=scores)


@dataclass(frozen=True)
class BatchPlan:
    inference: int  # the sweep's passes, teacher outputs, evaluations
    training: int  # self-distillation
    checkpointing: bool  # activation checkpointing in self-distillation
    statistics: int  # the layer statistics' forward-only pass
    gradient: int  # the layer statistics' backward pass (no checkpointing)
    statistics_groups: int = 1  # groups of layers the statistics are measured in, one at a time


def batch_plan(ckpt: Checkpoint, width: float, calib: CalibrationSet, device: torch.device, given: int | None) -> BatchPlan:
    """Batches for the calibration latent: --batch-size, or what the device's free memory holds. Distillation gets at
    most the default 16, with activation checkpointing where it pays (model/budget.py: training_batch_for)."""
    hw = calib.latent_hw
    free = free_memory_bytes(device, available_memory_bytes())
    infer = given or batch_size_for(ckpt.config, width, hw, free, on_cpu=device.type == "cpu")
    train, checkpointing = training_batch_for(ckpt.config, width, hw, free, cap=min(DistillSettings.batch_size, given or MAX_BATCH),
                                              on_cpu=device.type == "cpu")
    # the statistics are measured in groups of layers where all their sums (F and H: 11 GiB at the paper's width 1.0)
    # would not fit a share of the free memory, and their batches fit what is left once one group's are held
    held = statistics_bytes(layer_shapes(ckpt.config, width, hw))
    groups = statistics_groups_for(held, free)
    statistics, gradient = statistics_batches_for(ckpt.config, width, hw, free, -(-held // groups),
                                                  forward_cap=infer, gradient_cap=min(GRADIENT_BATCH, infer))
    return BatchPlan(inference=infer, training=train, checkpointing=checkpointing, statistics=statistics, gradient=gradient,
                     statistics_groups=groups)


def compress(ckpt: Checkpoint, dense, deploy: DeployDiT, width: float, opts: CompressionOptions, resolved: ResolvedCompression,
             compress_hw: tuple[int, int], query_chunk: int | None, timer: StageTimer,
             progress: Progress | None = None) -> CompressionResult:
    """Palettize `deploy` (and self-distil its biases and norms) in place; returns what was done and measured."""
    bits = Bits(opts.bits)
    with timer.stage("calibrate"):
        recorded = calibration_for(ckpt, width, resolved.calibration, compress_hw, resolved.device, progress)
    # a seeded fifth of the inputs is held out of every step below: the PSNR the report puts first is measured on it
    calib, held_out = recorded.split(HELD_OUT_FRACTION)
    teacher = graph_at_calibration_size(dense, calib, query_chunk, resolved.device)
    batches = batch_plan(ckpt, width, calib, resolved.device, opts.batch_size)
    infer_batch, train_batch = batches.inference, batches.training
    sweeping = bits is Bits.MIXED and resolved.recipe is None
    if sweeping:
        needed = dict.fromkeys(palettizable_layers(teacher), list(opts.sweep.candidates))
    else:
        chosen = resolved.recipe.bits if bits is Bits.MIXED else uniform_bits(teacher, bits.uniform)
        needed = {n: [b] for n, b in chosen.items() if b < KEEP_FP16}
    with timer.stage("statistics"):  # and, while a group of layers' are held, the palettes they need and their scores
        cache, scores = palette_cache(teacher, calib, opts.palettes, opts.group_size, opts.sweep.mode if sweeping else None,
                                      needed, batches, progress)
    recipe = None
    if bits is Bits.MIXED:
        recipe = resolved.recipe
        if recipe is None:
            with timer.stage("sweep"):
                recipe = sweep_recipe(teacher, ckpt.config.name, width, calib, opts.sweep, cache, progress, infer_batch, scores)
        bits_map = recipe.bits
    else:
        bits_map = uniform_bits(deploy, bits.uniform)
    with timer.stage("palettize"):
        palettes = palettes_for(deploy, bits_map, opts.group_size, cache)
        # the layer statistics (H and F, each as large as the weights) and the other candidates' palettes are freed
        # before any weight is decoded: at the paper's width 1.0 they are 10.6 GiB, the decoded weights 5.5 GiB
        del cache
        release_freed_host_memory()
        apply_palettes(deploy, palettes)
        student = graph_at_calibration_size(dense, calib, query_chunk, resolved.device)
        apply_palettes(student, palettes, share_with=deploy)  # one decoded copy where both graphs live on one device
        student.checkpoint_blocks = batches.checkpointing
    sizes = {n: m.weight.numel() for n, m in palettizable_layers(deploy).items()}
    sets = {"calibration": calib, "held_out": held_out if held_out is not None else calib}
    with torch.no_grad():
        references = {k: calibration_outputs(teacher, v, infer_batch) for k, v in sets.items()}
        psnr = {"palettized": {k: round(output_psnr(references[k], calibration_outputs(student, v, infer_batch)), 3)
                               for k, v in sets.items()}}
    distilled = None
    if opts.distill and opts.distill_steps != 0:
        with timer.stage("distill"):  # trains on every calibration input; the held-out ones are only measured
            distilled = distill(student, teacher, calib, opts.distill_settings(train_batch, infer_batch), progress=progress,
                                holdout=held_out, targets=(references["calibration"], references["held_out"]))
        load_trained_state(deploy, {n: v.cpu() for n, v in trained_state(student).items()})
        psnr["distilled"] = {"calibration": distilled.psnr_after_db, "held_out": distilled.holdout_psnr_after_db}
    return CompressionResult(
        calibration={**calib.meta, "latent": list(calib.latent_hw), "inputs": len(calib),
                     "held_out": len(held_out) if held_out is not None else 0, "device": resolved.device.type,
                     "batch_size": infer_batch, "statistics_batch_size": batches.statistics, "gradient_batch_size": batches.gradient,
                     "statistics_groups": batches.statistics_groups,
                     "distill_batch_size": train_batch,
                     "distill_activation_checkpointing": batches.checkpointing},
        recipe=recipe, bits_per_layer=bits_map,
        average_bits=round(sum(bits_map[n] * sizes[n] for n in bits_map) / sum(sizes[n] for n in bits_map), 4),
        group_size=opts.group_size, calibration_psnr_db={k: v["calibration"] for k, v in psnr.items()},
        heldout_psnr_db={k: v["held_out"] for k, v in psnr.items()} if held_out is not None else {},
        distill=distilled, palettes=palettes, palette_method=opts.palettes,
    )

"""The export pipeline users run, in the order it runs, one output folder per width:

    load and validate -> extract width -> rewrite -> [calibrate -> sweep (or --recipe) -> palettize -> self-distill]
    -> convert -> verify -> package

`run_export` is the whole pipeline as one readable function per width (`export_width`); `run_sweep` and
`verify_exported` are the `sweep` and `verify` commands. All widths are staged together and committed together
(atomic_outputs): an export that fails or is interrupted in any width, or whose verification misses its bar,
leaves no output and leaves an old one untouched.

    from edgecompile.export import ExportOptions, run_export
    from edgecompile.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint("my_ckpt")
    [report] = run_export(ckpt, ExportOptions(output=Path("dist"), widths=[0.5], bits="mixed"))
    print(report.path, report.verify.psnr_db, report.average_bits)
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from edgecompile import __version__
from edgecompile.atomic import atomic_outputs, atomic_path, check_output_path, safe_name
from edgecompile.compress.calibration import (CalibrationSet, check_calibration_width, check_finite, default_calibration, load_calibration,
                                             load_user_prompts)
from edgecompile.compress.distill import DISTILLED_STATE, DistillSettings, distill, load_trained_state, trained_state
from edgecompile.compress.importance import measure_statistics
from edgecompile.compress.palettize_model import (
    DEFAULT_PALETTE_METHOD,
    PALETTE_METHODS,
    PALETTES_FILE,
    PaletteCache,
    check_group_size,
    layer_shapes,
    palettizable_layers,
    palettize_deploy,
    save_palettes,
    uniform_bits,
)
from edgecompile.compress.recipe import DEFAULT_TARGET_BITS, PALETTE_BITS, Recipe, check_recipe_fits, load_recipe, make_recipe
from edgecompile.compress.sensitivity import DEFAULT_MODE as DEFAULT_SWEEP_MODE
from edgecompile.compress.sensitivity import MODES as SWEEP_MODES
from edgecompile.compress.sensitivity import calibration_outputs, output_psnr
from edgecompile.compress.simulate import simulated_model_for_package
from edgecompile.coreml.convert import TARGETS, combine_functions, convert_chunks, convert_to_mlmodel, set_metadata
from edgecompile.coreml.generate import SampleSettings, generate, grid_title, save_grid, select_prompts
from edgecompile.coreml.package import (ANE_MAX_WEIGHT_FILE_BYTES, CHUNK, CHUNK_PACKAGES, FUNCTIONS, PackageView, function_name, load_package,
                                       weight_file_bytes)
from edgecompile.coreml.swift import write_swift_resources
from edgecompile.coreml.verify import (DEFAULT_MIN_PSNR_DB, GenerationSummary, VerifyResult, check_min_psnr, check_verifiable,
                                      checkpoint_for, verify_package)
from edgecompile.coremltools_loader import import_coremltools
from edgecompile.deploy.chunks import check_chunks, split_deploy
from edgecompile.deploy.contract import PackageInfo, bits_metadata, example_inputs, package_metadata
from edgecompile.deploy.dit import DeployDiT
from edgecompile.deploy.onnx_export import export_onnx
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.digest import sha256_file
from edgecompile.errors import EdgeCompileError, VerificationFailed
from edgecompile.export_report import REPORT_FILE, ChunkReport, CompressionResult, ExportReport, FunctionReport
from edgecompile.jsonutil import dumps
from edgecompile.model.budget import MAX_BATCH, available_memory_bytes, batch_size_for, check_fits, training_batch_for
from edgecompile.model.checkpoint import Checkpoint, Prompts
from edgecompile.model.config import width_label
from edgecompile.model.device import free_memory_bytes, peak_memory_gib, reset_peak_memory, resolve_device
from edgecompile.model.elastic import count_params, extract_width

BITS_CHOICES = ("16", "8", "6", "4", "mixed")
FORMATS = ("coreml", "onnx")
SWIFT_DENOISER = "MultiModalDiffusionTransformer"  # ml-stable-diffusion's SD3 denoiser resource name
SAMPLES_GRID = "samples.png"  # the package's samples beside the checkpoint's, in each width's folder

Progress = Callable[[str, int, int], None]
log = logging.getLogger("edgecompile")


@dataclass(frozen=True)
class SweepSettings:
    """How a mixed-bit recipe is made: `export --bits mixed` and `edgecompile sweep`."""

    candidates: tuple[int, ...] = (4, 8)
    mode: str = DEFAULT_SWEEP_MODE
    target_bits: float | None = DEFAULT_TARGET_BITS  # ignored when target_psnr_db is set
    target_psnr_db: float | None = None

    def validate(self, option: str = "--candidates") -> None:
        if any(b not in PALETTE_BITS for b in self.candidates) or len(set(self.candidates)) < 2:
            raise EdgeCompileError(f"{option} {','.join(map(str, self.candidates))}: give two or more of {PALETTE_BITS} (e.g. 4,8)")
        if self.mode not in SWEEP_MODES:
            raise EdgeCompileError(f"--sweep-mode {self.mode} is not supported: use one of {', '.join(SWEEP_MODES)}")
        if self.target_psnr_db is not None:
            if not math.isfinite(self.target_psnr_db):
                raise EdgeCompileError(f"--target-psnr {self.target_psnr_db} is not a finite number of dB (e.g. --target-psnr 40)")
            return
        lo, hi = min(self.candidates), max(self.candidates)
        if self.target_bits is None or not math.isfinite(self.target_bits) or not lo <= self.target_bits <= hi:
            shown = "none" if self.target_bits is None else f"{self.target_bits:g}"
            raise EdgeCompileError(f"--target-bits {shown} is outside {lo}..{hi} (the candidate bit-widths): "
                                   f"e.g. --target-bits {DEFAULT_TARGET_BITS}")


@dataclass
class ExportOptions:
    output: Path
    widths: list[float]
    bits: str = "16"
    latent_hw: tuple[int, int] | None = None
    # --latent A,B,...: the other latent sizes, each one more function of one multifunction package (iOS18)
    more_latents: tuple[tuple[int, int], ...] = ()
    target: str = "iOS17"
    fmt: str = "coreml"
    force: bool = False
    verify: bool = True
    query_chunk: int | None = None
    chunks: int = 1  # the denoiser cut into this many packages at block boundaries (deploy/chunks.py)
    device: str = "auto"  # where calibration, the sweep and self-distillation run (model/device.py)
    batch_size: int | None = None  # inference batch of the sweep and teacher outputs (default: from free memory)
    # compress small, export big: calibration, sweep and distillation at this latent (default: --latent)
    calibration_latent: tuple[int, int] | None = None
    # mixed-bit palettization
    recipe: Path | None = None
    sweep: SweepSettings = field(default_factory=SweepSettings)
    palettes: str = DEFAULT_PALETTE_METHOD  # how LUTs and indices are chosen (compress/palettize_model.py)
    group_size: int | None = None
    calibration: Path | None = None
    # self-distillation (palettized exports)
    distill: bool = True
    distill_steps: int | None = None
    distill_budget_minutes: float | None = None  # steps sized by time (DistillSettings.budget_seconds)
    swift_resources: bool = False
    # verification gate
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    generate: bool = True  # checkpoints that ship prompts: sample through the package too (VerifyResult.generation)
    keep_failed: bool = False

    def validate(self, ckpt: Checkpoint) -> ResolvedInputs:
        """Every option checked before any work, so a bad one costs nothing and writes nothing; the recipe and the
        calibration set are loaded here, once, and handed to the pipeline."""
        resolved = ResolvedInputs(device=resolve_device(self.device))
        if self.bits not in BITS_CHOICES:
            raise EdgeCompileError(f"--bits {self.bits} is not supported: use one of {', '.join(BITS_CHOICES)}")
        if self.fmt not in FORMATS:
            raise EdgeCompileError(f"--format {self.fmt} is not supported: use one of {', '.join(FORMATS)}")
        if self.target not in TARGETS:
            raise EdgeCompileError(f"--target {self.target} is not supported: use one of {', '.join(TARGETS)}")
        if self.fmt == "onnx" and self.bits != "16":
            raise EdgeCompileError("--format onnx exports fp32/fp16 graphs only: drop --bits or use --format coreml")
        if self.swift_resources and self.fmt != "coreml":
            raise EdgeCompileError("--swift-resources lays out Core ML packages: drop --format onnx")
        if not self.widths:
            raise EdgeCompileError("no width to export: pass --width 0.5 (or a comma list, or 'all')")
        for w in self.widths:
            ckpt.config.check_trained_width(w)
        if len(set(self.widths)) != len(self.widths):
            raise EdgeCompileError(f"--width names a width twice ({', '.join(map(width_label, self.widths))}): name each once")
        latent_hw = tuple(self.latent_hw or ckpt.config.sample_size)
        ckpt.config.check_latent_size(*latent_hw)
        for w in self.widths:
            check_fits(ckpt.config, w, latent_hw, what=f"--latent {latent_hw[0]}x{latent_hw[1]}")
        if self.more_latents:
            sizes = [latent_hw, *map(tuple, self.more_latents)]
            if len(set(sizes)) != len(sizes):
                raise EdgeCompileError(f"--latent names a size twice ({','.join(f'{h}x{w}' for h, w in sizes)}): name each once")
            if self.fmt != "coreml" or self.target != "iOS18":
                raise EdgeCompileError("several --latent sizes make one multifunction Core ML package, which needs iOS18: "
                                       "add --target iOS18 (and drop --format onnx)")
            if self.chunks != 1:
                raise EdgeCompileError("--chunks with several --latent sizes is not supported: export each size on its own, or drop --chunks")
            for hw in self.more_latents:
                ckpt.config.check_latent_size(*hw)
                for w in self.widths:
                    check_fits(ckpt.config, w, tuple(hw), what=f"--latent {hw[0]}x{hw[1]}")
        if self.calibration_latent is not None:
            if self.bits == "16":
                raise EdgeCompileError("--calibration-latent applies to palettized exports: add --bits 4, 6, 8 or mixed")
            ckpt.config.check_latent_size(*self.calibration_latent)
            for w in self.widths:
                check_fits(ckpt.config, w, self.calibration_latent, what="--calibration-latent {}x{}".format(*self.calibration_latent))
        if self.batch_size is not None and self.batch_size < 1:
            raise EdgeCompileError(f"--batch-size {self.batch_size} must be a positive number of inputs (e.g. 8)")
        if self.chunks != 1:
            if self.fmt != "coreml":
                raise EdgeCompileError("--chunks splits Core ML packages (for the Neural Engine's weight-file limit): drop --format onnx")
            check_chunks(ckpt.config, self.chunks)
        if self.query_chunk is not None and self.query_chunk < 1:
            raise EdgeCompileError(f"--query-chunk {self.query_chunk} must be a positive number of tokens (e.g. 512)")
        check_min_psnr(self.min_psnr_db)
        layers = {w: layer_shapes(ckpt.config, w, latent_hw) for w in self.widths}
        check_palette_method(self.palettes)
        if self.bits == "mixed":
            self.sweep.validate()
            if self.recipe is not None:
                recipe = load_recipe(self.recipe)
                if len(self.widths) != 1 or abs(recipe.width - self.widths[0]) > 1e-9:
                    raise EdgeCompileError(f"recipe {self.recipe} is for width {recipe.width:g}: pass --width {recipe.width:g}")
                check_recipe_fits(recipe, layers[self.widths[0]], self.widths[0], str(self.recipe))
                resolved.recipe = recipe
        elif self.recipe is not None:
            raise EdgeCompileError("--recipe applies to --bits mixed: add --bits mixed")
        if self.group_size is not None:
            if self.group_size < 1:
                raise EdgeCompileError(f"--group-size {self.group_size} must be a positive number of output channels (e.g. 16)")
            if self.target != "iOS18":
                raise EdgeCompileError("--group-size needs per-grouped-channel LUTs, which need iOS18: add --target iOS18")
            if self.bits == "16":
                raise EdgeCompileError("--group-size applies to palettized weights: add --bits 4, 6, 8 or mixed")
            for w, ls in layers.items():
                check_group_size(ls, self.group_size, w)
        self.distill_settings().validate()
        if self.calibration is not None:
            resolved.calibration = load_checked_calibration(self.calibration, ckpt, self.widths)
            have = tuple(resolved.calibration.latent.shape[2:])
            if self.calibration_latent is not None and have != tuple(self.calibration_latent):
                raise EdgeCompileError(f"calibration file {self.calibration} holds {have[0]}x{have[1]} latents, not the "
                                       "--calibration-latent {}x{}: drop one of the two".format(*self.calibration_latent))
        for w in self.widths:
            check_output_path(self.width_dir(w), self.force, self.inputs(ckpt))
        return resolved

    def inputs(self, ckpt: Checkpoint) -> list[Path | None]:
        """Everything an output must never be, contain or lie inside."""
        return [ckpt.path, self.recipe, self.calibration]

    def width_dir(self, width: float) -> Path:
        return self.output / f"w{width_label(width)}"

    def distill_settings(self, batch_size: int = DistillSettings.batch_size,
                         eval_batch_size: int = DistillSettings.eval_batch_size) -> DistillSettings:
        budget = self.distill_budget_minutes * 60 if self.distill_budget_minutes is not None else None
        return DistillSettings(steps=self.distill_steps, budget_seconds=budget, batch_size=batch_size, eval_batch_size=eval_batch_size)

    def compress_latent(self, ckpt: Checkpoint) -> tuple[int, int]:
        """The latent size calibration, sweep and distillation run at: --calibration-latent, else --latent."""
        return tuple(self.calibration_latent or self.latent_hw or ckpt.config.sample_size)


@dataclass
class ResolvedInputs:
    """The files options name, loaded once by ExportOptions.validate."""

    recipe: Recipe | None = None
    calibration: CalibrationSet | None = None
    device: torch.device = torch.device("cpu")


def load_checked_calibration(path: Path, ckpt: Checkpoint, widths: list[float]) -> CalibrationSet:
    calib = load_calibration(path)
    calib.check(ckpt.config, source=f"calibration file {path}")
    for w in widths:
        check_calibration_width(calib, w, f"calibration file {path}")
    if calib.meta.get("width") is not None and len(widths) > 1:
        raise EdgeCompileError(f"calibration file {path} holds one width's trajectories ({float(calib.meta['width']):g}): "
                               "export one width with it, or drop --calibration")
    return calib


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


def package_name(config_name: str, width: float, bits: str, fmt: str) -> str:
    """The package's file name. The model name comes from data, so it is made a safe name, never a path.
    ONNX exports hold fp32 weights and are named so."""
    if fmt == "onnx":
        tag = "fp32"
    else:
        tag = "fp16" if bits == "16" else f"{bits}bit" if bits != "mixed" else "mixedbit"
    return f"{safe_name(config_name)}_w{width_label(width)}_{tag}" + (".mlpackage" if fmt == "coreml" else ".onnx")


# ---- compress: calibrate -> statistics -> sweep -> palettize -> self-distill ----------------------------------
HELD_OUT_FRACTION = 0.2
def calibration_for(ckpt: Checkpoint, width: float, given: CalibrationSet | None, latent_hw: tuple[int, int] | None = None,
                    device: torch.device | str = "cpu", progress: Progress | None = None) -> CalibrationSet:
    calib = given if given is not None else default_calibration(ckpt, width, latent_hw, device=device, progress=progress)
    check_finite(calib, "calibration set")
    return calib


def graph_at_calibration_size(dense, calib: CalibrationSet, query_chunk: int | None = None,
                              device: torch.device | str = "cpu") -> DeployDiT:
    """Sweep and distillation run on deploy graphs at the calibration latent size, on `device`; palettes and
    distilled parameters carry over to the export graph (on the CPU, for conversion) by layer name."""
    return deploy_model(dense, latent_hw=tuple(calib.latent.shape[2:]), query_chunk=query_chunk).to(device)


def check_palette_method(method: str) -> None:
    if method not in PALETTE_METHODS:
        raise EdgeCompileError(f"--palettes {method} is not supported: use one of {', '.join(PALETTE_METHODS)}")


def palette_cache(teacher: DeployDiT, calib: CalibrationSet, method: str, group_size: int | None, sweep_mode: str | None,
                  batch_size: int, progress: Progress | None = None) -> PaletteCache:
    """The palettes of `teacher`'s layers; the layer statistics (one forward pass and a backward pass on a third of
    the calibration inputs) are measured once when the palette method or the propagated sweep needs them."""
    stats = None
    if method != "plain" or sweep_mode == "propagated":
        stats = measure_statistics(teacher, palettizable_layers(teacher), calib, batch_size, progress=progress)
    return PaletteCache(teacher, group_size, method, stats)


def sweep_recipe(teacher: DeployDiT, config_name: str, width: float, calib: CalibrationSet, settings: SweepSettings,
                 cache: PaletteCache, progress: Progress | None = None, batch_size: int = MAX_BATCH) -> Recipe:
    return make_recipe(teacher, config_name, width, calib, list(settings.candidates), settings.mode, settings.target_bits,
                       settings.target_psnr_db, cache=cache, progress=progress, batch_size=batch_size)


@dataclass(frozen=True)
class BatchPlan:
    inference: int  # the sweep's passes, teacher outputs, evaluations
    training: int  # self-distillation
    checkpointing: bool  # activation checkpointing in self-distillation


def batch_plan(ckpt: Checkpoint, width: float, calib: CalibrationSet, device: torch.device, given: int | None) -> BatchPlan:
    """Batches for the calibration latent: --batch-size, or what the device's free memory holds. Distillation gets at
    most the default 16, with activation checkpointing where it pays (model/budget.py: training_batch_for)."""
    hw = tuple(calib.latent.shape[2:])
    free = free_memory_bytes(device, available_memory_bytes())
    infer = given or batch_size_for(ckpt.config, width, hw, free)
    train, checkpointing = training_batch_for(ckpt.config, width, hw, free, cap=min(DistillSettings.batch_size, given or MAX_BATCH),
                                              on_cpu=device.type == "cpu")
    return BatchPlan(inference=infer, training=train, checkpointing=checkpointing)


def compress(ckpt: Checkpoint, dense, deploy: DeployDiT, width: float, opts: ExportOptions, resolved: ResolvedInputs,
             timer: StageTimer, progress: Progress | None = None) -> CompressionResult:
    """Palettize `deploy` (and self-distil its biases and norms) in place; returns what was done and measured."""
    with timer.stage("calibrate"):
        recorded = calibration_for(ckpt, width, resolved.calibration, opts.compress_latent(ckpt), resolved.device, progress)
    # a seeded fifth of the inputs is held out of every step below: the PSNR the report puts first is measured on it
    calib, held_out = recorded.split(HELD_OUT_FRACTION)
    teacher = graph_at_calibration_size(dense, calib, opts.query_chunk, resolved.device)
    batches = batch_plan(ckpt, width, calib, resolved.device, opts.batch_size)
    infer_batch, train_batch = batches.inference, batches.training
    sweeping = opts.bits == "mixed" and resolved.recipe is None
    with timer.stage("statistics"):
        cache = palette_cache(teacher, calib, opts.palettes, opts.group_size, opts.sweep.mode if sweeping else None, infer_batch, progress)
    recipe = None
    if opts.bits == "mixed":
        recipe = resolved.recipe
        if recipe is None:
            with timer.stage("sweep"):
                recipe = sweep_recipe(teacher, ckpt.config.name, width, calib, opts.sweep, cache, progress, infer_batch)
        bits_map = recipe.bits
    else:
        bits_map = uniform_bits(deploy, int(opts.bits))
    with timer.stage("palettize"):
        palettes = palettize_deploy(deploy, bits_map, opts.group_size, cache)
        student = graph_at_calibration_size(dense, calib, opts.query_chunk, resolved.device)
        palettize_deploy(student, bits_map, opts.group_size, cache)
        student.checkpoint_blocks = batches.checkpointing
    del cache  # the layer statistics (one matrix per layer) are not needed past here
    sizes = {n: m.weight.numel() for n, m in palettizable_layers(deploy).items()}
    sets = {"calibration": calib, "held_out": held_out if held_out is not None else calib}
    with torch.no_grad():
        references = {k: calibration_outputs(teacher, v, infer_batch) for k, v in sets.items()}

        def psnr_now() -> dict[str, float]:
            return {k: round(output_psnr(references[k], calibration_outputs(student, v, infer_batch)), 3) for k, v in sets.items()}

        psnr = {"palettized": psnr_now()}
    distilled = None
    if opts.distill and opts.distill_steps != 0:
        with timer.stage("distill"):
            distilled = distill(student, teacher, calib, opts.distill_settings(train_batch, infer_batch), progress=progress)
        load_trained_state(deploy, {n: v.cpu() for n, v in trained_state(student).items()})
        with torch.no_grad():
            psnr["distilled"] = psnr_now()
    return CompressionResult(
        calibration={**calib.meta, "latent": list(calib.latent.shape[2:]), "inputs": len(calib),
                     "held_out": len(held_out) if held_out is not None else 0, "device": resolved.device.type,
                     "batch_size": infer_batch, "distill_batch_size": train_batch,
                     "distill_activation_checkpointing": batches.checkpointing},
        recipe=recipe, bits_per_layer=bits_map,
        average_bits=round(sum(bits_map[n] * sizes[n] for n in bits_map) / sum(sizes[n] for n in bits_map), 4),
        group_size=opts.group_size, calibration_psnr_db={k: v["calibration"] for k, v in psnr.items()},
        heldout_psnr_db={k: v["held_out"] for k, v in psnr.items()} if held_out is not None else {},
        distill=distilled, palettes=palettes, palette_method=opts.palettes,
    )


# ---- one width ---------------------------------------------------------------------------------------------------
def chunk_package_names(name: str, n: int, swift: bool) -> list[str]:
    """--chunks N: the package files in run order, named as apple/ml-stable-diffusion names its U-Net chunks
    (UnetChunk1.mlpackage, ...): `<denoiser>Chunk<k>` in Swift resources, `<stem>_chunk<k>` otherwise."""
    stem = name.removesuffix(".mlpackage")
    return [f"{stem}{'Chunk' if swift else '_chunk'}{k}.mlpackage" for k in range(1, n + 1)]


def convert_and_save(deploy: DeployDiT, path: Path, opts: ExportOptions, info: PackageInfo, extra: dict[str, str],
                     compression: CompressionResult | None) -> str | None:
    """Write the package at `path`; returns the coremltools version for Core ML packages."""
    if opts.fmt == "onnx":
        export_onnx(deploy, path, metadata=package_metadata(info, deploy))
        return None
    ct = import_coremltools()
    ml = convert_to_mlmodel(deploy, target=opts.target, palettes=compression.palettes if compression else None)
    if compression:
        extra = {**extra, **bits_metadata(compression.bits_per_layer, opts.group_size)}
    set_metadata(ml, info, deploy, extra=extra)
    ml.save(str(path))
    del ml  # its temporary package lives in the staging folder: let coremltools drop it now
    return ct.__version__


def convert_and_save_chunks(deploy: DeployDiT, paths: list[Path], opts: ExportOptions, info: PackageInfo, extra: dict[str, str],
                            compression: CompressionResult | None) -> list[ChunkReport]:
    """--chunks N: each chunk converted and saved in turn, with the metadata that binds it to the others."""
    example = example_inputs(deploy)
    chunks, io = split_deploy(deploy, len(paths), example)
    extra = {**extra, CHUNK_PACKAGES: json.dumps([p.name for p in paths])}
    if compression:
        extra.update(bits_metadata(compression.bits_per_layer, opts.group_size))
    reports = []
    models = convert_chunks(chunks, io, example, target=opts.target, palettes=compression.palettes if compression else None)
    for chunk, names, path, ml in zip(chunks, io, paths, models):
        set_metadata(ml, info, deploy, extra={**extra, CHUNK: f"{chunk.index}/{chunk.count}"})
        ml.save(str(path))
        del ml
        reports.append(ChunkReport(package=path.name, blocks=[chunk.start, chunk.end],
                                   inputs={n: names.shapes[n] for n in names.inputs}, outputs={n: names.shapes[n] for n in names.outputs},
                                   size_bytes=size_on_disk(path), weight_file_bytes=weight_file_bytes(path)))
    return reports


def function_graphs(dense, deploy: DeployDiT, opts: ExportOptions) -> list[tuple[str, DeployDiT]]:
    """(function name, deploy graph) per latent size of a multifunction export, the default (--latent's first)
    first. Every graph holds the very parameters of `deploy` (palettized and distilled ones included): the sizes
    differ only in their constants (position table, micro-conditions)."""
    graphs = [(function_name(deploy.latent_hw), deploy)]
    for hw in opts.more_latents:
        other = deploy_model(dense, latent_hw=tuple(hw), query_chunk=opts.query_chunk)
        other.load_state_dict(deploy.state_dict(keep_vars=True), assign=True)  # shared, not copied
        graphs.append((function_name(tuple(hw)), other))
    return graphs


def convert_functions(graphs: list[tuple[str, DeployDiT]], path: Path, opts: ExportOptions, info: PackageInfo, extra: dict[str, str],
                      compression: CompressionResult | None) -> str | None:
    """Each latent size converted on its own, then combined into one multifunction package at `path`."""
    with tempfile.TemporaryDirectory(prefix="functions-") as scratch:  # inside the staging folder (scratch_tempdir)
        parts = []
        for function, graph in graphs:
            part = Path(scratch) / f"{function}.mlpackage"
            version = convert_and_save(graph, part, opts, info, extra, compression)
            parts.append((function, str(part)))
        functions = {name: "{}x{}".format(*graph.latent_hw) for name, graph in graphs}
        combine_functions(parts, str(path), {FUNCTIONS: json.dumps(functions)})
    return version


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_width(ckpt: Checkpoint, width: float, opts: ExportOptions, resolved: ResolvedInputs, out_dir: Path,
                 timer: StageTimer, progress: Progress | None = None) -> ExportReport:
    """Build one width's output in `out_dir` (a staging folder); returns its report (also written as report.json)."""
    config = ckpt.config
    latent_hw = tuple(opts.latent_hw or config.sample_size)
    with timer.stage("extract"):
        # views of the supernetwork, no copy (a 1.6B model is 5.5 GiB in fp32); palettization and distillation
        # replace parameters rather than writing into them, so the checkpoint stays intact for the next width
        dense = extract_width(ckpt.model, width, share=True)
    with timer.stage("rewrite"):
        deploy = deploy_model(dense, latent_hw=latent_hw, query_chunk=opts.query_chunk)
    ckpt_sha = sha256_file(ckpt.path / "model.safetensors") if ckpt.path else None
    pkg_dir = out_dir / "Resources" if opts.swift_resources else out_dir
    name = f"{SWIFT_DENOISER}.mlpackage" if opts.swift_resources else package_name(config.name, width, opts.bits, opts.fmt)
    report = ExportReport(
        edgecompile=__version__, config=config.to_dict(), width=width, params=count_params(config, width),
        latent=list(latent_hw), bits=opts.bits, format=opts.fmt, target=opts.target,
        checkpoint=str(ckpt.path) if ckpt.path else None, checkpoint_sha256=ckpt_sha,
        package=f"Resources/{name}" if opts.swift_resources else name, torch_threads=torch.get_num_threads(),
    )
    if opts.bits != "16":
        report.compression = compress(ckpt, dense, deploy, width, opts, resolved, timer, progress)
    pkg_dir.mkdir(exist_ok=True)
    extra = {}
    if report.compression:  # the verifier's simulation decodes these (compress/simulate.py)
        save_palettes(report.compression.palettes, pkg_dir / PALETTES_FILE)
        extra["edgecompile.palettes_sha256"] = sha256_file(pkg_dir / PALETTES_FILE)
    if report.compression and report.compression.distill:
        save_file(trained_state(deploy), str(pkg_dir / DISTILLED_STATE))
        extra["edgecompile.distilled_sha256"] = sha256_file(pkg_dir / DISTILLED_STATE)
    if report.compression and report.compression.recipe:
        (out_dir / "recipe.json").write_text(dumps(report.compression.recipe.to_dict()) + "\n")
    info = PackageInfo(width=width, params=report.params, config=report.config, checkpoint_sha256=ckpt_sha, bits=opts.bits)
    graphs: list[tuple[str | None, DeployDiT]] = [(None, deploy)]  # (function, graph): None for a one-function package
    if opts.chunks > 1:
        paths = [pkg_dir / n for n in chunk_package_names(name, opts.chunks, opts.swift_resources)]
        report.package = str(Path(report.package).parent / paths[0].name)
        with timer.stage("convert"):
            report.chunks = convert_and_save_chunks(deploy, paths, opts, info, extra, report.compression)
            report.coremltools = import_coremltools().__version__
    elif opts.more_latents:
        paths = [pkg_dir / name]
        graphs = function_graphs(dense, deploy, opts)
        with timer.stage("convert"):
            report.coremltools = convert_functions(graphs, paths[0], opts, info, extra, report.compression)
    else:
        paths = [pkg_dir / name]
        with timer.stage("convert"):
            report.coremltools = convert_and_save(deploy, paths[0], opts, info, extra, report.compression)
    pkg_path = paths[0]  # the chunk that takes the package inputs
    report.size_bytes = sum(size_on_disk(p) for p in paths)
    weights = max(weight_file_bytes(p) for p in paths) if opts.fmt == "coreml" else 0
    if weights > ANE_MAX_WEIGHT_FILE_BYTES:
        log.warning("width %g: a weight file is %.2f GiB, over the Neural Engine's %g GiB limit (Core ML will run it on the "
                    "GPU or CPU): palettize it (--bits 4 or mixed), split it (--chunks %d) or export a smaller width",
                    width, weights / 2**30, ANE_MAX_WEIGHT_FILE_BYTES / 2**30,
                    max(2, opts.chunks * math.ceil(weights / ANE_MAX_WEIGHT_FILE_BYTES)))
    if opts.verify:
        with timer.stage("verify"):
            # a palettized package's reference is the torch graph it was converted from, decoded weights included
            for function, graph in graphs:
                view = load_package(pkg_path, function=function)
                result = verify_package(view, ckpt, graph if report.compression else None, min_psnr_db=opts.min_psnr_db, progress=progress)
                if opts.generate and ckpt.prompts is not None and opts.fmt == "coreml":
                    # the app's loop through the package, against the checkpoint's samples from the same noise
                    grid = SAMPLES_GRID if function is None else f"samples_{function}.png"
                    samples = generate(view, ckpt, ckpt.prompts, progress=progress)
                    save_grid(samples.grid_rows(), samples.labels, out_dir / grid, grid_title(samples, view))
                    result.generation = samples.summary(grid=grid)
                if function is None:
                    report.verify = result
                else:
                    report.functions.append(FunctionReport(name=function, latent=list(view.latent_hw), verify=result))
            if report.functions:
                report.verify = report.functions[0].verify
    if opts.swift_resources:
        write_swift_resources(pkg_dir, paths, deploy, report.chunks, graphs if opts.more_latents else None)
    report.stage_seconds = dict(timer.seconds)
    report.stage_peak_memory_gib = dict(timer.peak_memory_gib)
    (out_dir / REPORT_FILE).write_text(dumps(report.to_dict()) + "\n")
    report.path = str(opts.width_dir(width) / report.package)
    return report


def run_export(ckpt: Checkpoint, opts: ExportOptions, on_stage: Callable[[str], None] | None = None,
               progress: Progress | None = None) -> list[ExportReport]:
    """Every width in turn, staged together and committed together; the loaded checkpoint (and coremltools) are
    shared between widths. A verification below its bar raises VerificationFailed and ships nothing, unless
    `keep_failed`, which commits the outputs for inspection (report.json says so) and then raises."""
    resolved = opts.validate(ckpt)
    if opts.fmt == "coreml":
        import_coremltools()  # before the first interruptible stage: its import swallows Ctrl-C
    reports, failed = [], []
    with atomic_outputs([opts.width_dir(w) for w in opts.widths], force=opts.force, inputs=opts.inputs(ckpt)) as stages:
        for w, out_dir in zip(opts.widths, stages):
            torch.manual_seed(0)  # per width: a width's output does not depend on which widths came before
            timer = StageTimer(on_stage=(lambda s, w=w: on_stage(f"w{width_label(w)}: {s}")) if on_stage else None,
                               device=resolved.device)
            report = export_width(ckpt, w, opts, resolved, out_dir, timer, progress)
            reports.append(report)
            if report.verify is not None and not report.verify.passed:
                message = f"width {w:g}: verification failed: {report.verify.problem}"
                if not opts.keep_failed:
                    raise VerificationFailed(f"{message}; nothing was written (--keep-failed keeps the package for inspection)")
                failed.append(message)
    if failed:
        raise VerificationFailed("; ".join(failed) + f"; kept for inspection in {opts.output} (--keep-failed)")
    return reports


# ---- the sweep and verify commands -------------------------------------------------------------------------------
@dataclass
class SweepOptions:
    output: Path
    width: float = 0.5
    settings: SweepSettings = field(default_factory=SweepSettings)
    palettes: str = DEFAULT_PALETTE_METHOD
    group_size: int | None = None
    calibration: Path | None = None
    latent_hw: tuple[int, int] | None = None  # the calibration latent when no file is given (default: sample_size)
    device: str = "auto"
    force: bool = False

    def validate(self, ckpt: Checkpoint) -> CalibrationSet | None:
        """Checked before any work; returns the calibration file's set, loaded once."""
        ckpt.config.check_trained_width(self.width)
        check_output_path(self.output, self.force, inputs=[ckpt.path, self.calibration])
        self.settings.validate("--bits")
        check_palette_method(self.palettes)
        calib = load_checked_calibration(self.calibration, ckpt, [self.width]) if self.calibration else None
        if self.latent_hw is not None:
            ckpt.config.check_latent_size(*self.latent_hw)
            check_fits(ckpt.config, self.width, self.latent_hw, what="--latent {}x{}".format(*self.latent_hw))
        if self.group_size is not None:
            hw = tuple(calib.latent.shape[2:]) if calib is not None else tuple(self.latent_hw or ckpt.config.sample_size)
            check_group_size(layer_shapes(ckpt.config, self.width, hw), self.group_size, self.width)
        return calib


def run_sweep(ckpt: Checkpoint, opts: SweepOptions, on_stage: Callable[[str], None] | None = None,
              progress: Progress | None = None) -> Recipe:
    """The export's calibrate -> sweep path for one width, saved as a recipe for `export --recipe`."""
    given = opts.validate(ckpt)
    device = resolve_device(opts.device)
    on_stage = on_stage or (lambda _: None)
    on_stage("calibration inputs")
    calib = calibration_for(ckpt, opts.width, given, opts.latent_hw, device, progress)
    teacher = graph_at_calibration_size(extract_width(ckpt.model, opts.width, share=True), calib, device=device)
    on_stage(f"{opts.settings.mode} sweep")
    infer_batch = batch_plan(ckpt, opts.width, calib, device, None).inference
    cache = palette_cache(teacher, calib, opts.palettes, opts.group_size, opts.settings.mode, infer_batch, progress)
    recipe = sweep_recipe(teacher, ckpt.config.name, opts.width, calib, opts.settings, cache, progress, infer_batch)
    recipe.save(opts.output, force=opts.force, inputs=[ckpt.path, opts.calibration])
    return recipe


def verify_exported(package: str | Path, checkpoint: str | Path | None = None, precision: str = "fp32", runtime: str = "auto",
                    min_psnr_db: float = DEFAULT_MIN_PSNR_DB, device: str = "cpu", generate_with: SampleSettings | None = None,
                    function: str | None = None) -> VerifyResult:
    """Verify a package written by `export` against the checkpoint it came from (the bundled one by default):
    a palettized package against edgecompile's simulation rebuilt from the checkpoint and its export folder.
    `function` picks one function of a multifunction package (default: its default function; see
    `verify_every_function`). The torch references run on `device` (--device). With `generate_with`, also sample
    through the package with the checkpoint's prompts (`verify --generate`)."""
    torch_device = resolve_device(device)
    view = load_package(package, function=function)
    check_verifiable(view, min_psnr_db)
    ckpt = checkpoint_for(view, checkpoint)
    if generate_with is not None:
        generate_with.validate()
        if ckpt.prompts is None:
            raise EdgeCompileError(f"--generate samples with the checkpoint's prompts and {ckpt.path} ships none: "
                                   "use `edgecompile sample PACKAGE --prompts FILE` with your own text embeddings")
    result = verify_package(view, ckpt, simulated_model_for_package(view, ckpt, torch_device), precision=precision, runtime=runtime,
                            min_psnr_db=min_psnr_db, device=torch_device)
    if generate_with is not None:
        result.generation = generate(view, ckpt, ckpt.prompts, settings=generate_with, runtime=runtime, device=torch_device).summary()
    return result


def verify_every_function(package: str | Path, **kwargs) -> list[VerifyResult]:
    """`verify_exported` of every function of a multifunction package, the default first (one result otherwise)."""
    names = list(load_package(package).functions) or [None]
    return [verify_exported(package, function=name, **kwargs) for name in names]


@dataclass
class SampleJob:
    """`edgecompile sample`, every input read and checked (resolve_sample) before any sampling starts."""

    view: PackageView
    ckpt: Checkpoint
    prompts: Prompts
    labels: list[str] | None
    settings: SampleSettings
    output: Path
    compare: bool
    runtime: str
    device: torch.device
    force: bool
    inputs: list


def resolve_sample(package: str | Path, output: str | Path, checkpoint: str | Path | None = None, labels: list[str] | None = None,
                   prompts_file: str | Path | None = None, settings: SampleSettings | None = None, compare: bool = False,
                   runtime: str = "auto", device: str = "cpu", force: bool = False, function: str | None = None) -> SampleJob:
    settings = settings or SampleSettings()
    settings.validate()
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise EdgeCompileError(f"-o {output}: sample writes a PNG picture grid: give a path ending in .png, e.g. -o grid.png")
    inputs = [package, checkpoint, prompts_file]
    check_output_path(output, force, inputs=inputs)
    view = load_package(package, function=function)
    if view.width is None or view.latent_hw is None:
        raise EdgeCompileError(f"package {view.path} has no edgecompile metadata: sample runs packages written by `edgecompile export`")
    ckpt = checkpoint_for(view, checkpoint)
    prompts = ckpt.prompts
    if prompts_file is not None:
        tokens, null = load_user_prompts(prompts_file, ckpt.config)
        if null is None and settings.cfg_scale != 1.0:
            raise EdgeCompileError(f"prompts file {prompts_file} has no 'null' embedding, which guidance needs: add it or pass --cfg 1")
        prompts = Prompts(tokens=tokens, null=null if null is not None else torch.zeros_like(tokens[:1]),
                          labels=[f"prompt {i}" for i in range(len(tokens))])
    select_prompts(prompts, labels, str(prompts_file or ckpt.path or "the checkpoint"))  # unknown labels fail here
    return SampleJob(view=view, ckpt=ckpt, prompts=prompts, labels=labels, settings=settings, output=output, compare=compare,
                     runtime=runtime, device=resolve_device(device), force=force, inputs=inputs)


def run_sample(job: SampleJob, progress: Progress | None = None) -> GenerationSummary:
    """The app's sampling loop through the package, written as a labelled PNG grid (with `compare`, the
    checkpoint's samples from the same noise as a second row)."""
    result = generate(job.view, job.ckpt, job.prompts, job.labels, job.settings, compare=job.compare, runtime=job.runtime,
                      device=job.device, progress=progress)
    with atomic_path(job.output, force=job.force, is_dir=False, inputs=job.inputs) as target:
        save_grid(result.grid_rows(), result.labels, target, grid_title(result, job.view))
    return result.summary(grid=str(job.output))

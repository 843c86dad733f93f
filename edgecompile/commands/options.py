"""The export's options as typed groups, each checking itself before any work (so a bad option costs nothing and
writes nothing), and the one convention every command follows: `Options.resolve(ckpt)` checks everything, loads
the files the options name, and returns a frozen `Resolved...` value the pipeline reads; nothing downstream
re-derives a default or re-validates a choice.

    LatentPlan           --latent A[,B,...], --calibration-latent: the sizes, defaults filled once
    CompressionOptions   --bits, --recipe, the sweep, --palettes, --group-size, --calibration, distillation, batches, --device
    PackageOptions       --format, --target, --chunks, --swift-resources, --query-chunk
    VerificationOptions  --no-verify, --min-psnr, --no-generate, --keep-failed
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgecompile.atomic import check_output_path
from edgecompile.choices import PALETTE_BITS, Bits, Format, PaletteMethod, SweepMode, Target
from edgecompile.compress.calibration import CalibrationSet, check_calibration_width, load_calibration
from edgecompile.compress.distill import DistillSettings
from edgecompile.compress.palettize_model import DEFAULT_PALETTE_METHOD, check_group_size, layer_shapes
from edgecompile.compress.recipe import DEFAULT_TARGET_BITS, Recipe, check_recipe_fits, load_recipe
from edgecompile.compress.sensitivity import DEFAULT_MODE as DEFAULT_SWEEP_MODE
from edgecompile.coreml.verify import DEFAULT_MIN_PSNR_DB, check_min_psnr
from edgecompile.deploy.chunks import check_chunks
from edgecompile.errors import EdgeCompileError
from edgecompile.model.budget import check_fits
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.config import ModelConfig, width_label
from edgecompile.model.device import resolve_device

LatentHW = tuple[int, int]


def latent_arg(hw: LatentHW) -> str:
    return f"{hw[0]}x{hw[1]}"


@dataclass(frozen=True)
class SweepSettings:
    """How a mixed-bit recipe is made: `export --bits mixed` and `edgecompile sweep`."""

    candidates: tuple[int, ...] = (4, 8)
    mode: SweepMode = DEFAULT_SWEEP_MODE
    target_bits: float | None = DEFAULT_TARGET_BITS  # ignored when target_psnr_db is set
    target_psnr_db: float | None = None

    def validate(self, option: str = "--candidates") -> None:
        if any(b not in PALETTE_BITS for b in self.candidates) or len(set(self.candidates)) < 2:
            raise EdgeCompileError(f"{option} {','.join(map(str, self.candidates))}: give two or more of {PALETTE_BITS} (e.g. 4,8)")
        SweepMode.parse(self.mode, "--sweep-mode")
        if self.target_psnr_db is not None:
            if not math.isfinite(self.target_psnr_db):
                raise EdgeCompileError(f"--target-psnr {self.target_psnr_db} is not a finite number of dB (e.g. --target-psnr 40)")
            return
        lo, hi = min(self.candidates), max(self.candidates)
        if self.target_bits is None or not math.isfinite(self.target_bits) or not lo <= self.target_bits <= hi:
            shown = "none" if self.target_bits is None else f"{self.target_bits:g}"
            raise EdgeCompileError(f"--target-bits {shown} is outside {lo}..{hi} (the candidate bit-widths): "
                                   f"e.g. --target-bits {DEFAULT_TARGET_BITS}")


@dataclass(frozen=True)
class ResolvedLatents:
    """Every latent size of one export, defaults filled in."""

    package: LatentHW  # the package's size (its default function's)
    more: tuple[LatentHW, ...]  # further sizes, one function each of a multifunction package
    compress: LatentHW  # where calibration, the sweep and distillation run

    @property
    def all(self) -> tuple[LatentHW, ...]:
        return (self.package, *self.more)


@dataclass(frozen=True)
class LatentPlan:
    """--latent A[,B,...] and --calibration-latent (compress small, export big)."""

    package: LatentHW | None = None  # default: the config's sample_size
    more: tuple[LatentHW, ...] = ()
    calibration: LatentHW | None = None  # default: the package's size

    def resolve(self, config: ModelConfig, widths: list[float]) -> ResolvedLatents:
        package = tuple(self.package or config.sample_size)
        config.check_latent_size(*package)
        for w in widths:
            check_fits(config, w, package, what=f"--latent {latent_arg(package)}")
        more = tuple(tuple(hw) for hw in self.more)
        if more:
            sizes = [package, *more]
            if len(set(sizes)) != len(sizes):
                raise EdgeCompileError(f"--latent names a size twice ({','.join(map(latent_arg, sizes))}): name each once")
            for hw in more:
                config.check_latent_size(*hw)
                for w in widths:
                    check_fits(config, w, hw, what=f"--latent {latent_arg(hw)}")
        if self.calibration is not None:
            config.check_latent_size(*self.calibration)
            for w in widths:
                check_fits(config, w, self.calibration, what=f"--calibration-latent {latent_arg(self.calibration)}")
        return ResolvedLatents(package=package, more=more, compress=tuple(self.calibration or package))


@dataclass(frozen=True)
class PackageOptions:
    """What is written: the format, the Core ML target and how the denoiser is laid out in files."""

    fmt: Format = Format.COREML
    target: Target = Target.IOS17
    chunks: int = 1  # the denoiser cut into this many packages at block boundaries (deploy/chunks.py)
    swift_resources: bool = False
    query_chunk: int | None = None
    pipeline: bool = False  # also the text encoder, VAE decoder, tokenizer and pipeline.json (commands/pipeline.py)
    img2img: bool = False  # --pipeline: the VAE encoder too (image-to-image)
    text_encoder_chunks: int | None = None  # --pipeline: the text encoder in N packages (default: as the 2 GiB limit needs)

    @property
    def resources(self) -> bool:
        """The Swift Resources/ layout: asked for, or implied by --pipeline."""
        return self.swift_resources or self.pipeline

    def validate(self, config: ModelConfig, bits: Bits, latents: LatentPlan) -> None:
        fmt = Format.parse(self.fmt, "--format")
        target = Target.parse(self.target, "--target")
        if self.pipeline and fmt is Format.ONNX:
            raise EdgeCompileError("--pipeline writes Core ML packages (or Core AI assets) for the Swift pipelines: drop --format onnx")
        if self.text_encoder_chunks is not None and (not self.pipeline or self.text_encoder_chunks < 1):
            raise EdgeCompileError("--text-encoder-chunks N (N >= 1) cuts the pipeline's text encoder into N packages: add --pipeline")
        if self.img2img and not self.pipeline:
            raise EdgeCompileError("--img2img adds the VAE encoder to the pipeline's packages: add --pipeline")
        if self.pipeline and latents.more:
            raise EdgeCompileError("--pipeline with several --latent sizes is not supported yet: export one size")
        if fmt is Format.ONNX and bits is not Bits.FP16:
            raise EdgeCompileError("--format onnx exports fp32/fp16 graphs only: drop --bits or use --format coreml")
        if self.resources and fmt is Format.ONNX:
            raise EdgeCompileError("--swift-resources lays out Core ML packages (or Core AI assets): drop --format onnx")
        if latents.more and fmt is Format.ONNX:
            raise EdgeCompileError("several --latent sizes make one multifunction package (Core ML, iOS18) or one Core AI asset "
                                   "with an entrypoint per size: use --format coreml --target iOS18 or --format aimodel")
        if latents.more and fmt is Format.COREML:
            if target is not Target.IOS18:
                raise EdgeCompileError("several --latent sizes make one multifunction Core ML package, which needs iOS18: "
                                       "add --target iOS18 (and drop --format onnx)")
            if self.chunks != 1:
                raise EdgeCompileError("--chunks with several --latent sizes is not supported: export each size on its own, or drop --chunks")
        if self.chunks != 1 and config.text_mask:
            raise EdgeCompileError("--chunks of a denoiser with a text attention mask (PixArt) is not supported yet: drop --chunks "
                                   "(PixArt-Sigma XL's fp16 weights, 1.2 GiB, fit the Neural Engine's 2 GiB in one file)")
        if self.chunks != 1:
            if fmt is Format.ONNX:
                raise EdgeCompileError("--chunks splits Core ML packages and Core AI assets (for the Neural Engine's weight-file limit): "
                                       "drop --format onnx")
            check_chunks(config, self.chunks)
        if self.query_chunk is not None and self.query_chunk < 1:
            raise EdgeCompileError(f"--query-chunk {self.query_chunk} must be a positive number of tokens (e.g. 512)")


@dataclass(frozen=True)
class VerificationOptions:
    """The gate every package passes before it ships."""

    verify: bool = True
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    generate: bool = True  # checkpoints that ship prompts: sample through the package too (VerifyResult.generation)
    keep_failed: bool = False

    def validate(self) -> None:
        check_min_psnr(self.min_psnr_db)


@dataclass(frozen=True)
class ResolvedCompression:
    """The files the compression options name, loaded once, and the device the torch stages run on."""

    recipe: Recipe | None
    calibration: CalibrationSet | None
    device: torch.device


@dataclass(frozen=True)
class CompressionOptions:
    """Palettization (bits, recipe or sweep, palette method, groups), its calibration data and self-distillation."""

    bits: Bits = Bits.FP16
    recipe: Path | None = None
    sweep: SweepSettings = field(default_factory=SweepSettings)
    palettes: PaletteMethod = DEFAULT_PALETTE_METHOD  # how LUTs and indices are chosen (compress/palettize_model.py)
    group_size: int | None = None
    calibration: Path | None = None
    distill: bool = True
    distill_steps: int | None = None
    distill_budget_minutes: float | None = None  # steps sized by time (DistillSettings.budget_seconds)
    batch_size: int | None = None  # inference batch of the sweep and teacher outputs (default: from free memory)
    device: str = "auto"  # where calibration, the sweep and self-distillation run (model/device.py)

    def distill_settings(self, batch_size: int = DistillSettings.batch_size,
                         eval_batch_size: int = DistillSettings.eval_batch_size) -> DistillSettings:
        budget = self.distill_budget_minutes * 60 if self.distill_budget_minutes is not None else None
        return DistillSettings(steps=self.distill_steps, budget_seconds=budget, batch_size=batch_size, eval_batch_size=eval_batch_size)

    def resolve(self, ckpt: Checkpoint, widths: list[float], latents: ResolvedLatents, target: Target,
                calibration_latent_given: bool, fmt: Format = Format.COREML) -> ResolvedCompression:
        device = resolve_device(self.device)
        bits = Bits.parse(self.bits, "--bits")
        if calibration_latent_given and not bits.palettized:
            raise EdgeCompileError("--calibration-latent applies to palettized exports: add --bits 4, 6, 8 or mixed")
        if self.batch_size is not None and self.batch_size < 1:
            raise EdgeCompileError(f"--batch-size {self.batch_size} must be a positive number of inputs (e.g. 8)")
        layers = {w: layer_shapes(ckpt.config, w, latents.package) for w in widths}
        PaletteMethod.parse(self.palettes, "--palettes")
        recipe = None
        if bits is Bits.MIXED:
            self.sweep.validate()
            if self.recipe is not None:
                recipe = load_recipe(self.recipe)
                if len(widths) != 1 or abs(recipe.width - widths[0]) > 1e-9:
                    raise EdgeCompileError(f"recipe {self.recipe} is for width {recipe.width:g}: pass --width {recipe.width:g}")
                check_recipe_fits(recipe, layers[widths[0]], widths[0], str(self.recipe))
        elif self.recipe is not None:
            raise EdgeCompileError("--recipe applies to --bits mixed: add --bits mixed")
        if self.group_size is not None:
            if self.group_size < 1:
                raise EdgeCompileError(f"--group-size {self.group_size} must be a positive number of output channels (e.g. 16)")
            if target is not Target.IOS18 and fmt is Format.COREML:  # Core AI's LUT constants take groups on any axis
                raise EdgeCompileError("--group-size needs per-grouped-channel LUTs, which need iOS18: add --target iOS18")
            if not bits.palettized:
                raise EdgeCompileError("--group-size applies to palettized weights: add --bits 4, 6, 8 or mixed")
            for w, ls in layers.items():
                check_group_size(ls, self.group_size, w)
        self.distill_settings().validate()
        calibration = None
        if self.calibration is not None:
            calibration = load_checked_calibration(self.calibration, ckpt, widths)
            if calibration_latent_given and calibration.latent_hw != latents.compress:
                have = calibration.latent_hw
                raise EdgeCompileError(f"calibration file {self.calibration} holds {have[0]}x{have[1]} latents, not the "
                                       f"--calibration-latent {latent_arg(latents.compress)}: drop one of the two")
        return ResolvedCompression(recipe=recipe, calibration=calibration, device=device)


def load_checked_calibration(path: Path, ckpt: Checkpoint, widths: list[float]) -> CalibrationSet:
    calib = load_calibration(path)
    calib.check(ckpt.config, source=f"calibration file {path}")
    for w in widths:
        check_calibration_width(calib, w, f"calibration file {path}")
    if calib.meta.get("width") is not None and len(widths) > 1:
        raise EdgeCompileError(f"calibration file {path} holds one width's trajectories ({float(calib.meta['width']):g}): "
                               "export one width with it, or drop --calibration")
    return calib


@dataclass(frozen=True)
class ResolvedExport:
    """An export, every option checked and every file it names loaded: what `run_export` runs."""

    options: ExportOptions
    latents: ResolvedLatents
    compression: ResolvedCompression

    @property
    def bits(self) -> Bits:
        return Bits(self.options.compression.bits)

    @property
    def fmt(self) -> Format:
        return Format(self.options.package.fmt)


@dataclass(frozen=True)
class ExportOptions:
    output: Path
    widths: list[float]
    latents: LatentPlan = field(default_factory=LatentPlan)
    compression: CompressionOptions = field(default_factory=CompressionOptions)
    package: PackageOptions = field(default_factory=PackageOptions)
    verification: VerificationOptions = field(default_factory=VerificationOptions)
    force: bool = False

    def resolve(self, ckpt: Checkpoint) -> ResolvedExport:
        if not self.widths:
            raise EdgeCompileError("no width to export: pass --width 0.5 (or a comma list, or 'all')")
        for w in self.widths:
            ckpt.config.check_trained_width(w)
        if len(set(self.widths)) != len(self.widths):
            raise EdgeCompileError(f"--width names a width twice ({', '.join(map(width_label, self.widths))}): name each once")
        bits = Bits.parse(self.compression.bits, "--bits")
        self.package.validate(ckpt.config, bits, self.latents)
        latents = self.latents.resolve(ckpt.config, self.widths)
        self.verification.validate()
        compression = self.compression.resolve(ckpt, self.widths, latents, Target(self.package.target),
                                               calibration_latent_given=self.latents.calibration is not None,
                                               fmt=Format.parse(self.package.fmt, "--format"))
        for w in self.widths:
            check_output_path(self.width_dir(w), self.force, self.inputs(ckpt))
        return ResolvedExport(options=self, latents=latents, compression=compression)

    def inputs(self, ckpt: Checkpoint) -> list[Path | None]:
        """Everything an output must never be, contain or lie inside."""
        return [ckpt.path, self.compression.recipe, self.compression.calibration]

    def width_dir(self, width: float) -> Path:
        return self.output / f"w{width_label(width)}"

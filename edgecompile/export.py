"""The export pipeline users run: load -> extract width -> rewrite -> [calibrate -> sweep -> palettize ->
self-distill] -> convert -> verify -> package, one output folder per width.

All widths are staged together and committed together (atomic_outputs): an export that fails or is interrupted
in any width, or whose verification misses its bar, leaves no output and leaves an old one untouched."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgecompile import __version__
from edgecompile.atomic import atomic_outputs, check_output_path, safe_name
from edgecompile.errors import EdgeCompileError, VerificationFailed
from edgecompile.jsonutil import dumps
from edgecompile.model.budget import check_fits
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.config import width_label
from edgecompile.model.elastic import count_params, extract_width

BITS_CHOICES = ("16", "8", "6", "4", "mixed")
FORMATS = ("coreml", "onnx")
SWEEP_MODES = ("local", "e2e")
SWIFT_DENOISER = "MultiModalDiffusionTransformer"  # ml-stable-diffusion's SD3 denoiser resource name
DISTILLED_STATE = "distilled.safetensors"  # beside the package: the verifier's simulation needs it


@dataclass
class ExportOptions:
    output: Path
    widths: list[float]
    bits: str = "16"
    latent_hw: tuple[int, int] | None = None
    target: str = "iOS17"
    fmt: str = "coreml"
    force: bool = False
    verify: bool = True
    query_chunk: int | None = None
    # mixed-bit palettization
    recipe: Path | None = None
    target_bits: float = 4.3
    candidates: tuple[int, ...] = (4, 8)
    sweep_mode: str = "local"
    group_size: int | None = None
    calibration: Path | None = None
    # self-distillation (palettized exports)
    distill: bool = True
    distill_steps: int | None = None
    swift_resources: bool = False
    # verification gate
    min_psnr_db: float = 60.0
    keep_failed: bool = False

    def validate(self, ckpt: Checkpoint) -> "ResolvedInputs":
        """Every option checked before any work, so a bad one costs nothing and writes nothing; the recipe and the
        calibration set are loaded here, once, and handed to the pipeline."""
        from edgecompile.compress.palettize_model import check_group_size, layer_shapes

        resolved = ResolvedInputs()
        if self.bits not in BITS_CHOICES:
            raise EdgeCompileError(f"--bits {self.bits} is not supported: use one of {', '.join(BITS_CHOICES)}")
        if self.fmt not in FORMATS:
            raise EdgeCompileError(f"--format {self.fmt} is not supported: use one of {', '.join(FORMATS)}")
        if self.sweep_mode not in SWEEP_MODES:
            raise EdgeCompileError(f"--sweep-mode {self.sweep_mode} is not supported: use local or e2e")
        if self.fmt == "onnx" and self.bits != "16":
            raise EdgeCompileError("--format onnx exports fp32/fp16 graphs only: drop --bits or use --format coreml")
        if self.swift_resources and self.fmt != "coreml":
            raise EdgeCompileError("--swift-resources lays out Core ML packages: drop --format onnx")
        if not self.widths:
            raise EdgeCompileError("no width to export: pass --width 0.5 (or a comma list, or 'all')")
        for w in self.widths:
            ckpt.config.dims(w)
        if len(set(self.widths)) != len(self.widths):
            raise EdgeCompileError(f"--width names a width twice ({', '.join(map(width_label, self.widths))}): name each once")
        latent_hw = tuple(self.latent_hw or ckpt.config.sample_size)
        ckpt.config.check_latent_size(*latent_hw)
        for w in self.widths:
            check_fits(ckpt.config, w, latent_hw, what=f"--latent {latent_hw[0]}x{latent_hw[1]}")
        if self.query_chunk is not None and self.query_chunk < 1:
            raise EdgeCompileError(f"--query-chunk {self.query_chunk} must be a positive number of tokens (e.g. 512)")
        if not math.isfinite(self.min_psnr_db):
            raise EdgeCompileError(f"--min-psnr {self.min_psnr_db} is not a finite number of dB (e.g. --min-psnr 60)")
        if not math.isfinite(self.target_bits):
            raise EdgeCompileError(f"--target-bits {self.target_bits} is not a finite number (e.g. --target-bits 4.3)")
        layers = {w: layer_shapes(ckpt.config, w, latent_hw) for w in self.widths}
        if self.bits == "mixed":
            from edgecompile.compress.recipe import PALETTE_BITS

            if any(b not in PALETTE_BITS for b in self.candidates) or len(self.candidates) < 2:
                raise EdgeCompileError(f"--candidates {','.join(map(str, self.candidates))}: give two or more of {PALETTE_BITS} (e.g. 4,8)")
            lo, hi = min(self.candidates), max(self.candidates)
            if not lo <= self.target_bits <= hi:
                raise EdgeCompileError(f"--target-bits {self.target_bits:g} is outside {lo}..{hi} (the candidate bit-widths): e.g. --target-bits 4.3")
            if self.recipe is not None:
                from edgecompile.compress.recipe import load_recipe

                from edgecompile.compress.recipe import check_recipe_fits

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
        if self.distill_steps is not None and self.distill_steps < 0:
            raise EdgeCompileError(f"--distill-steps {self.distill_steps} must be >= 0")
        if self.calibration is not None:
            from edgecompile.compress.calibration import check_calibration_width, load_calibration

            calib = load_calibration(self.calibration)
            calib.check(ckpt.config, source=f"calibration file {self.calibration}")
            for w in self.widths:
                check_calibration_width(calib, w, f"calibration file {self.calibration}")
            want = calib.meta.get("width")
            if want is not None and len(self.widths) > 1:
                raise EdgeCompileError(f"calibration file {self.calibration} holds one width's trajectories ({float(want):g}): "
                                       "export one width with it, or drop --calibration")
            resolved.calibration = calib
        for w in self.widths:
            check_output_path(self.width_dir(w), self.force, self.inputs(ckpt))
        return resolved

    def inputs(self, ckpt: Checkpoint) -> list[Path | None]:
        """Everything an output must never be, contain or lie inside."""
        return [ckpt.path, self.recipe, self.calibration]

    def width_dir(self, width: float) -> Path:
        return self.output / f"w{width_label(width)}"


@dataclass
class ResolvedInputs:
    """The files options name, loaded once by ExportOptions.validate."""

    recipe: object | None = None  # compress.recipe.Recipe
    calibration: object | None = None  # compress.calibration.CalibrationSet


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)
    on_stage: Callable[[str], None] | None = None

    @contextmanager
    def stage(self, name: str):
        if self.on_stage:
            self.on_stage(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def package_name(config_name: str, width: float, bits: str, fmt: str) -> str:
    """The package's file name. The model name comes from data, so it is made a safe name, never a path.
    ONNX exports hold fp32 weights and are named so."""
    if fmt == "onnx":
        tag = "fp32"
    else:
        tag = "fp16" if bits == "16" else f"{bits}bit" if bits != "mixed" else "mixedbit"
    return f"{safe_name(config_name)}_w{width_label(width)}_{tag}" + (".mlpackage" if fmt == "coreml" else ".onnx")


def compress(ckpt: Checkpoint, dense, deploy, width: float, opts: ExportOptions, resolved: ResolvedInputs, timer: StageTimer,
             report: dict, progress=None) -> dict:
    """Sweep (or read the recipe), palettize and self-distill; `deploy` gets the final weights. Fills the report
    and returns the palettes by layer.

    Sweep and distillation run on deploy graphs at the calibration latent size (teacher: unquantized; student:
    palettized); palettes and distilled parameters carry over to the export graph by layer name."""
    from edgecompile.compress.distill import DistillSettings, distill, load_trained_state, trained_state
    from edgecompile.compress.palettize_model import palettizable_layers, palettize_deploy, uniform_bits
    from edgecompile.compress.sensitivity import PaletteCache, calibration_outputs, output_psnr
    from edgecompile.deploy.convert import deploy_model

    from edgecompile.compress.calibration import check_finite, default_calibration

    with timer.stage("calibrate"):
        calib = resolved.calibration if resolved.calibration is not None else default_calibration(ckpt, width)
        check_finite(calib, "calibration set")
    report["calibration"] = {**calib.meta, "inputs": len(calib)}
    calib_hw = tuple(calib.latent.shape[2:])
    teacher = deploy_model(dense, latent_hw=calib_hw, query_chunk=opts.query_chunk)
    cache = PaletteCache(teacher, opts.group_size)
    if opts.bits == "mixed":
        from edgecompile.compress.recipe import make_recipe

        if resolved.recipe is not None:
            recipe = resolved.recipe
        else:
            with timer.stage("sweep"):
                recipe = make_recipe(teacher, ckpt.config.name, width, calib, list(opts.candidates), opts.sweep_mode,
                                     opts.target_bits, cache=cache, progress=progress)
        bits_map = recipe.bits
        report["recipe"] = recipe.to_dict()
    else:
        bits_map = uniform_bits(deploy, int(opts.bits))
    with timer.stage("palettize"):
        palettes = palettize_deploy(deploy, bits_map, opts.group_size, cache)
        student = deploy_model(dense, latent_hw=calib_hw, query_chunk=opts.query_chunk)
        palettize_deploy(student, bits_map, opts.group_size, cache)
    sizes = {n: m.weight.numel() for n, m in palettizable_layers(deploy).items()}
    report["bits_per_layer"] = bits_map
    report["average_bits"] = round(sum(bits_map[n] * sizes[n] for n in bits_map) / sum(sizes[n] for n in bits_map), 4)
    report["group_size"] = opts.group_size
    with torch.no_grad():
        reference = calibration_outputs(teacher, calib)
        report["calibration_psnr_db"] = {"palettized": round(output_psnr(reference, calibration_outputs(student, calib)), 3)}
    if opts.distill and opts.distill_steps != 0:
        with timer.stage("distill"):
            result = distill(student, teacher, calib, DistillSettings(steps=opts.distill_steps), progress=progress)
        load_trained_state(deploy, trained_state(student))
        report["distill"] = result.to_dict()
        with torch.no_grad():
            report["calibration_psnr_db"]["distilled"] = round(output_psnr(reference, calibration_outputs(student, calib)), 3)
    return palettes


def export_width(ckpt: Checkpoint, width: float, opts: ExportOptions, resolved: ResolvedInputs, out_dir: Path,
                 timer: StageTimer, progress=None) -> dict:
    """Build one width's output in `out_dir` (a staging folder); returns its report (also written as report.json)."""
    from edgecompile.coreml.convert import PackageInfo, convert_to_mlmodel, package_metadata, set_metadata, sha256_file
    from edgecompile.coreml.verify import verify_package
    from edgecompile.deploy.convert import deploy_model

    config = ckpt.config
    latent_hw = tuple(opts.latent_hw or config.sample_size)
    with timer.stage("extract"):
        # views of the supernetwork, no copy (a 1.6B model is 5.5 GiB in fp32); palettization and distillation
        # replace parameters rather than writing into them, so the checkpoint stays intact for the next width
        dense = extract_width(ckpt.model, width, share=True)
    with timer.stage("rewrite"):
        deploy = deploy_model(dense, latent_hw=latent_hw, query_chunk=opts.query_chunk)
    params = count_params(config, width)
    ckpt_sha = sha256_file(ckpt.path / "model.safetensors") if ckpt.path else None
    name = package_name(config.name, width, opts.bits, opts.fmt)
    report: dict = {
        "edgecompile": __version__, "config": config.to_dict(), "width": width, "params": params,
        "latent": list(latent_hw), "bits": opts.bits, "format": opts.fmt, "target": opts.target,
        "checkpoint": str(ckpt.path) if ckpt.path else None, "checkpoint_sha256": ckpt_sha, "package": name,
        "torch_threads": torch.get_num_threads(),
    }
    palettes = compress(ckpt, dense, deploy, width, opts, resolved, timer, report, progress) if opts.bits != "16" else {}
    pkg_dir = out_dir / "Resources" if opts.swift_resources else out_dir
    pkg_dir.mkdir(exist_ok=True)
    if opts.swift_resources:
        name = f"{SWIFT_DENOISER}.mlpackage"
        report["package"] = f"Resources/{name}"
    pkg_path = pkg_dir / name
    info = PackageInfo(width=width, params=params, config=config.to_dict(), checkpoint_sha256=ckpt_sha, bits=opts.bits)
    extra = {}
    if "distill" in report:
        from safetensors.torch import save_file

        from edgecompile.compress.distill import trained_state

        save_file(trained_state(deploy), str(pkg_dir / DISTILLED_STATE))
        extra["edgecompile.distilled_sha256"] = sha256_file(pkg_dir / DISTILLED_STATE)
    if "recipe" in report:
        (out_dir / "recipe.json").write_text(dumps(report["recipe"]) + "\n")
    if opts.fmt == "onnx":
        from edgecompile.deploy.onnx_export import export_onnx

        with timer.stage("convert"):
            export_onnx(deploy, pkg_path, metadata=package_metadata(info, deploy))
        report["size_bytes"] = pkg_path.stat().st_size
    else:
        from edgecompile.coreml.convert import import_coremltools

        ct = import_coremltools()
        with timer.stage("convert"):
            ml = convert_to_mlmodel(deploy, target=opts.target, palettes=palettes)
            if palettes:
                from edgecompile.compress.palettize_model import bits_metadata

                extra.update(bits_metadata(report["bits_per_layer"], opts.group_size))
            set_metadata(ml, info, deploy, extra=extra)
            ml.save(str(pkg_path))
            del ml  # its temporary package lives in the staging folder: let coremltools drop it now
        report["coremltools"] = ct.__version__
        report["size_bytes"] = sum(f.stat().st_size for f in pkg_path.rglob("*") if f.is_file())
    if opts.verify:
        simulated = None
        if palettes:
            simulated = lambda x, t, c: deploy(x, t, c.transpose(1, 2)[:, :, None])  # noqa: E731
        with timer.stage("verify"):
            result = verify_package(pkg_path, ckpt.path, simulated=simulated, min_psnr_db=opts.min_psnr_db)
        report["verify"] = {**result.to_dict(), "package": report["package"]}
    if opts.swift_resources:
        from edgecompile.coreml.swift import write_swift_resources

        write_swift_resources(pkg_dir, pkg_path, deploy)
    report["stage_seconds"] = dict(timer.seconds)
    (out_dir / "report.json").write_text(dumps(report) + "\n")
    report["path"] = str(opts.width_dir(width) / report["package"])
    return report


def run_export(ckpt: Checkpoint, opts: ExportOptions, on_stage: Callable[[str], None] | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Every width in turn, staged together and committed together; the loaded checkpoint (and coremltools) are
    shared between widths. A verification below its bar raises VerificationFailed and ships nothing, unless
    `keep_failed`, which commits the outputs for inspection (report.json says so) and then raises."""
    resolved = opts.validate(ckpt)
    if opts.fmt == "coreml":
        from edgecompile.coreml.convert import import_coremltools

        import_coremltools()  # before the first interruptible stage: its import swallows Ctrl-C
    reports, failed = [], []
    with atomic_outputs([opts.width_dir(w) for w in opts.widths], force=opts.force, inputs=opts.inputs(ckpt)) as stages:
        for w, out_dir in zip(opts.widths, stages):
            torch.manual_seed(0)  # per width: a width's output does not depend on which widths came before
            timer = StageTimer(on_stage=(lambda s, w=w: on_stage(f"w{width_label(w)}: {s}")) if on_stage else None)
            report = export_width(ckpt, w, opts, resolved, out_dir, timer, progress)
            reports.append(report)
            verdict = report.get("verify")
            if verdict and not verdict["passed"]:
                message = f"width {w:g}: verification failed: {verdict['problem']}"
                if not opts.keep_failed:
                    raise VerificationFailed(f"{message}; nothing was written (--keep-failed keeps the package for inspection)")
                failed.append(message)
    if failed:
        raise VerificationFailed("; ".join(failed) + f"; kept for inspection in {opts.output} (--keep-failed)")
    return reports


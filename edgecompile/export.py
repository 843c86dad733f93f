"""The export pipeline users run: load -> extract width -> [sweep -> palettize -> self-distill] -> rewrite
-> convert -> verify -> package, one output folder per width, each written atomically."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgecompile import __version__
from edgecompile.atomic import atomic_path, check_output_path
from edgecompile.errors import EdgeCompileError
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

    def validate(self, ckpt: Checkpoint) -> None:
        """Every option checked before any work, so a bad one costs nothing and writes nothing."""
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
        for w in self.widths:
            ckpt.config.dims(w)
        ckpt.config.check_latent_size(*(self.latent_hw or ckpt.config.sample_size))
        if self.bits == "mixed":
            from edgecompile.compress.recipe import PALETTE_BITS

            if any(b not in PALETTE_BITS for b in self.candidates) or len(self.candidates) < 2:
                raise EdgeCompileError(f"--candidates {','.join(map(str, self.candidates))}: give two or more of {PALETTE_BITS} (e.g. 4,8)")
            lo, hi = min(self.candidates), max(self.candidates)
            if not lo <= self.target_bits <= hi:
                raise EdgeCompileError(f"--target-bits {self.target_bits:g} is outside {lo}..{hi} (the candidate bit-widths): e.g. --target-bits 4.3")
            if self.recipe is not None:
                from edgecompile.compress.recipe import load_recipe

                recipe = load_recipe(self.recipe)
                if len(self.widths) != 1 or abs(recipe.width - self.widths[0]) > 1e-9:
                    raise EdgeCompileError(f"recipe {self.recipe} is for width {recipe.width:g}: pass --width {recipe.width:g}")
        elif self.recipe is not None:
            raise EdgeCompileError("--recipe applies to --bits mixed: add --bits mixed")
        if self.group_size is not None:
            if self.group_size < 1:
                raise EdgeCompileError(f"--group-size {self.group_size} must be a positive number of output channels (e.g. 16)")
            if self.target != "iOS18":
                raise EdgeCompileError("--group-size needs per-grouped-channel LUTs, which need iOS18: add --target iOS18")
            if self.bits == "16":
                raise EdgeCompileError("--group-size applies to palettized weights: add --bits 4, 6, 8 or mixed")
        if self.distill_steps is not None and self.distill_steps < 0:
            raise EdgeCompileError(f"--distill-steps {self.distill_steps} must be >= 0")
        if self.calibration is not None:
            from edgecompile.compress.calibration import load_calibration

            load_calibration(self.calibration).check(ckpt.config, source=f"calibration file {self.calibration}")
        for w in self.widths:
            check_output_path(self.width_dir(w), self.force)

    def width_dir(self, width: float) -> Path:
        return self.output / f"w{width_label(width)}"


def parse_widths(text: str, config) -> list[float]:
    if text == "all":
        return list(config.widths)
    try:
        widths = [float(v) for v in text.split(",")]
    except ValueError:
        raise EdgeCompileError(f"--width {text!r} is not a number, a comma list or 'all' (e.g. --width 0.5)") from None
    for w in widths:
        config.dims(w)
    return widths


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
    tag = "fp16" if bits == "16" else f"{bits}bit" if bits != "mixed" else "mixedbit"
    return f"{config_name}_w{width_label(width)}_{tag}" + (".mlpackage" if fmt == "coreml" else ".onnx")


def calibration_for(ckpt: Checkpoint, width: float, opts: ExportOptions):
    from edgecompile.compress.calibration import default_calibration, load_calibration

    if opts.calibration is not None:
        return load_calibration(opts.calibration)
    return default_calibration(ckpt, width)


def compress(ckpt: Checkpoint, dense, deploy, width: float, opts: ExportOptions, timer: StageTimer, report: dict,
             progress=None) -> dict:
    """Sweep (or read the recipe), palettize and self-distill; `deploy` gets the final weights. Fills the report
    and returns the palettes by layer.

    Sweep and distillation run on deploy graphs at the calibration latent size (teacher: unquantized; student:
    palettized); palettes and distilled parameters carry over to the export graph by layer name."""
    from edgecompile.compress.distill import DistillSettings, distill, load_trained_state, trained_state
    from edgecompile.compress.palettize_model import palettizable_layers, palettize_deploy, uniform_bits
    from edgecompile.compress.sensitivity import PaletteCache, calibration_outputs, output_psnr
    from edgecompile.deploy.convert import deploy_model

    with timer.stage("calibrate"):
        calib = calibration_for(ckpt, width, opts)
        calib.check(ckpt.config, source="calibration set")
    report["calibration"] = {**calib.meta, "inputs": len(calib)}
    calib_hw = tuple(calib.latent.shape[2:])
    teacher = deploy_model(dense, latent_hw=calib_hw, query_chunk=opts.query_chunk)
    cache = PaletteCache(teacher, opts.group_size)
    if opts.bits == "mixed":
        from edgecompile.compress.recipe import check_recipe_fits, load_recipe, make_recipe

        if opts.recipe is not None:
            recipe = load_recipe(opts.recipe)
            check_recipe_fits(recipe, palettizable_layers(deploy), width, str(opts.recipe))
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


def export_width(ckpt: Checkpoint, width: float, opts: ExportOptions, timer: StageTimer, progress=None) -> dict:
    """Build one width's output folder; returns its report (also written as report.json)."""
    from edgecompile.coreml.convert import PackageInfo, convert_to_mlmodel, set_metadata, sha256_file
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
    }
    palettes = compress(ckpt, dense, deploy, width, opts, timer, report, progress) if opts.bits != "16" else {}
    with atomic_path(opts.width_dir(width), force=opts.force) as tmp:
        pkg_dir = tmp / "Resources" if opts.swift_resources else tmp
        pkg_dir.mkdir(exist_ok=True)
        if opts.swift_resources:
            name = f"{SWIFT_DENOISER}.mlpackage"
            report["package"] = f"Resources/{name}"
        pkg_path = pkg_dir / name
        extra = {}
        if "distill" in report:
            from safetensors.torch import save_file

            from edgecompile.compress.distill import trained_state

            save_file(trained_state(deploy), str(pkg_dir / DISTILLED_STATE))
            extra["edgecompile.distilled_sha256"] = sha256_file(pkg_dir / DISTILLED_STATE)
        if "recipe" in report:
            (tmp / "recipe.json").write_text(json.dumps(report["recipe"], indent=2) + "\n")
        if opts.fmt == "onnx":
            from edgecompile.deploy.onnx_export import export_onnx

            with timer.stage("convert"):
                export_onnx(deploy, pkg_path)
            report["size_bytes"] = pkg_path.stat().st_size
        else:
            from edgecompile.coreml.convert import import_coremltools

            ct = import_coremltools()  # quiet: coremltools prints warnings on import
            with timer.stage("convert"):
                ml = convert_to_mlmodel(deploy, target=opts.target, palettes=palettes)
                if palettes:
                    from edgecompile.compress.palettize_model import bits_metadata

                    extra.update(bits_metadata(report["bits_per_layer"], opts.group_size))
                info = PackageInfo(width=width, params=params, config=config.to_dict(), checkpoint_sha256=ckpt_sha, bits=opts.bits)
                set_metadata(ml, info, deploy, extra=extra)
                ml.save(str(pkg_path))
            report["coremltools"] = ct.__version__
            report["size_bytes"] = sum(f.stat().st_size for f in pkg_path.rglob("*") if f.is_file())
            if opts.verify:
                from edgecompile.coreml.verify import verify_package

                simulated = None
                if palettes:
                    simulated = lambda x, t, c: deploy(x, t, c.transpose(1, 2)[:, :, None])  # noqa: E731
                with timer.stage("verify"):
                    result = verify_package(pkg_path, ckpt.path, simulated=simulated)
                report["verify"] = result.to_dict()
                report["verify"]["package"] = report["package"]
            if opts.swift_resources:
                from edgecompile.coreml.swift import write_swift_resources

                write_swift_resources(pkg_dir, pkg_path, deploy)
        report["stage_seconds"] = dict(timer.seconds)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["path"] = str(opts.width_dir(width) / report["package"])
    return report


def run_export(ckpt: Checkpoint, opts: ExportOptions, on_stage: Callable[[str], None] | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Every width in turn; the loaded checkpoint (and coremltools) are shared between widths."""
    opts.validate(ckpt)
    reports = []
    for w in opts.widths:
        torch.manual_seed(0)  # per width: a width's output does not depend on which widths came before
        timer = StageTimer(on_stage=(lambda s, w=w: on_stage(f"w{width_label(w)}: {s}")) if on_stage else None)
        reports.append(export_width(ckpt, w, opts, timer, progress))
    return reports

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

    def validate(self, ckpt: Checkpoint) -> None:
        if self.bits not in BITS_CHOICES:
            raise EdgeCompileError(f"--bits {self.bits} is not supported: use one of {', '.join(BITS_CHOICES)}")
        if self.fmt not in FORMATS:
            raise EdgeCompileError(f"--format {self.fmt} is not supported: use one of {', '.join(FORMATS)}")
        for w in self.widths:
            ckpt.config.dims(w)
        ckpt.config.check_latent_size(*(self.latent_hw or ckpt.config.sample_size))
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


def export_width(ckpt: Checkpoint, width: float, opts: ExportOptions, timer: StageTimer) -> dict:
    """Build one width's output folder; returns its report (also written as report.json)."""
    from edgecompile.coreml.convert import PackageInfo, convert_to_mlmodel, set_metadata, sha256_file
    from edgecompile.compress.palettize_model import palettizable_layers
    from edgecompile.deploy.convert import deploy_model

    config = ckpt.config
    latent_hw = tuple(opts.latent_hw or config.sample_size)
    with timer.stage("extract"):
        dense = extract_width(ckpt.model, width)
    with timer.stage("rewrite"):
        deploy = deploy_model(dense, latent_hw=latent_hw, query_chunk=opts.query_chunk)
    palettes, bits_map = {}, {}
    if opts.bits != "16":
        from edgecompile.compress.palettize_model import palettize_deploy, uniform_bits

        if opts.bits == "mixed":
            raise EdgeCompileError("--bits mixed needs the sensitivity sweep, which this version does not have yet: use --bits 4, 6 or 8")
        with timer.stage("palettize"):
            bits_map = uniform_bits(deploy, int(opts.bits))
            palettes = palettize_deploy(deploy, bits_map)
    params = count_params(config, width)
    ckpt_sha = sha256_file(ckpt.path / "model.safetensors") if ckpt.path else None
    name = package_name(config.name, width, opts.bits, opts.fmt)
    report: dict = {
        "edgecompile": __version__, "config": config.to_dict(), "width": width, "params": params,
        "latent": list(latent_hw), "bits": opts.bits, "format": opts.fmt, "target": opts.target,
        "checkpoint": str(ckpt.path) if ckpt.path else None, "checkpoint_sha256": ckpt_sha, "package": name,
    }
    if bits_map:
        sizes = {n: m.weight.numel() for n, m in palettizable_layers(deploy).items()}
        report["bits_per_layer"] = bits_map
        report["average_bits"] = sum(bits_map[n] * sizes[n] for n in bits_map) / sum(sizes[n] for n in bits_map)
    with atomic_path(opts.width_dir(width), force=opts.force) as tmp:
        if opts.fmt == "onnx":
            from edgecompile.deploy.onnx_export import export_onnx

            with timer.stage("convert"):
                export_onnx(deploy, tmp / name)
            report["size_bytes"] = (tmp / name).stat().st_size
        else:
            from edgecompile.coreml.convert import import_coremltools

            ct = import_coremltools()  # quiet: coremltools prints warnings on import
            with timer.stage("convert"):
                ml = convert_to_mlmodel(deploy, target=opts.target)
                if palettes:
                    from edgecompile.compress.palettize_model import apply_palettes, bits_metadata

                    ml = apply_palettes(ml, palettes)
                info = PackageInfo(width=width, params=params, config=config.to_dict(), checkpoint_sha256=ckpt_sha, bits=opts.bits)
                set_metadata(ml, info, deploy, extra=bits_metadata(bits_map, None) if palettes else None)
                ml.save(str(tmp / name))
            report["coremltools"] = ct.__version__
            report["size_bytes"] = sum(f.stat().st_size for f in (tmp / name).rglob("*") if f.is_file())
            if opts.verify:
                from edgecompile.coreml.verify import verify_package

                simulated = None
                if palettes:
                    simulated = lambda x, t, c: deploy(x, t, c.transpose(1, 2)[:, :, None])  # noqa: E731
                with timer.stage("verify"):
                    result = verify_package(tmp / name, ckpt.path, simulated=simulated)
                report["verify"] = result.to_dict()
                report["verify"]["package"] = name
        report["stage_seconds"] = dict(timer.seconds)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["path"] = str(opts.width_dir(width) / name)
    return report


def run_export(ckpt: Checkpoint, opts: ExportOptions, on_stage: Callable[[str], None] | None = None) -> list[dict]:
    opts.validate(ckpt)
    torch.manual_seed(0)
    reports = []
    for w in opts.widths:
        timer = StageTimer(on_stage=(lambda s, w=w: on_stage(f"w{width_label(w)}: {s}")) if on_stage else None)
        reports.append(export_width(ckpt, w, opts, timer))
    return reports

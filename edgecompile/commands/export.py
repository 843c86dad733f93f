"""`edgecompile export`: the pipeline users run, one output folder per width, each step one call returning a value:

    extract -> rewrite -> compress(spec) -> write(layout, format) -> verify -> report

All widths are staged together and committed together (atomic_outputs): an export that fails or is interrupted
in any width, or whose verification misses its bar, leaves no output and leaves an old one untouched.

    from edgecompile.commands.export import run_export
    from edgecompile.commands.options import CompressionOptions, ExportOptions
    from edgecompile.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint("my_ckpt")
    [report] = run_export(ckpt, ExportOptions(output=Path("dist"), widths=[0.5], compression=CompressionOptions(bits="mixed")))
    print(report.path, report.verify.psnr_db, report.average_bits)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgecompile import __version__
from edgecompile.atomic import atomic_outputs
from edgecompile.choices import Format
from edgecompile.compress.distill import trained_state
from edgecompile.compress.sidecars import SWIFT_RESOURCES, write_sidecars
from edgecompile.coreai.convert import import_coreai
from edgecompile.coreml.generate import generate, grid_title, save_grid
from edgecompile.coreml.package import ANE_MAX_WEIGHT_FILE_BYTES, load_package
from edgecompile.coreml.swift import write_swift_resources
from edgecompile.coreml.verify import VerifyResult, verify_package
from edgecompile.coremltools_loader import import_coremltools
from edgecompile.deploy.contract import package_metadata
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.digest import sha256_file
from edgecompile.errors import VerificationFailed
from edgecompile.export_report import REPORT_FILE, CompressionResult, ExportReport, FunctionReport
from edgecompile.jsonutil import dumps
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.config import width_label
from edgecompile.model.elastic import count_params, extract_width

from edgecompile.commands.compression import Progress, StageTimer, compress
from edgecompile.commands.options import ExportOptions, ResolvedExport
from edgecompile.commands.pipeline import CompiledComponent, compile_components, write_components
from edgecompile.commands.write import SWIFT_DENOISER, PackageSpec, WrittenPackage, package_name, write_package

SAMPLES_GRID = "samples.png"  # the package's samples beside the checkpoint's, in each width's folder
log = logging.getLogger("edgecompile")


@dataclass
class Verification:
    """The verify step's results: one for a one-function package, one per function otherwise (default first)."""

    result: VerifyResult | None = None
    functions: list[FunctionReport] = field(default_factory=list)


def verify_written(written: WrittenPackage, ckpt: Checkpoint, compression: CompressionResult | None, run: ResolvedExport,
                   out_dir: Path, progress: Progress | None = None) -> Verification:
    """Execute each function of the written package against its reference; a palettized package's reference is
    the torch graph it was converted from, decoded weights included. Checkpoints that ship prompts are also
    sampled through the package (the app's loop) against the checkpoint's samples from the same noise."""
    gate = run.options.verification
    done = Verification()
    for function, graph in written.graphs:
        view = load_package(written.path, function=function)
        # the graph was converted already: from here on it is a torch-only reference, on batched attention
        result = verify_package(view, ckpt, graph.fuse_attention() if compression else None, min_psnr_db=gate.min_psnr_db, progress=progress)
        if gate.generate and ckpt.prompts is not None and run.fmt is not Format.ONNX:
            grid = SAMPLES_GRID if function is None else f"samples_{function}.png"
            samples = generate(view, ckpt, ckpt.prompts, progress=progress)
            save_grid(samples.grid_rows(), samples.labels, out_dir / grid, grid_title(samples, view))
            result.generation = samples.summary(grid=grid)
        if function is None:
            done.result = result
        else:
            done.functions.append(FunctionReport(name=function, latent=list(view.latent_hw), verify=result))
    if done.functions:
        done.result = done.functions[0].verify
    return done


def warn_large_weight_files(written: WrittenPackage, width: float, chunks: int) -> None:
    weights = written.largest_weight_file()
    if weights > ANE_MAX_WEIGHT_FILE_BYTES:
        log.warning("width %g: a weight file is %.2f GiB, over the Neural Engine's %g GiB limit (Core ML will run it on the "
                    "GPU or CPU): palettize it (--bits 4 or mixed), split it (--chunks %d) or export a smaller width",
                    width, weights / 2**30, ANE_MAX_WEIGHT_FILE_BYTES / 2**30,
                    max(2, chunks * math.ceil(weights / ANE_MAX_WEIGHT_FILE_BYTES)))


def export_width(ckpt: Checkpoint, width: float, run: ResolvedExport, out_dir: Path, timer: StageTimer,
                 progress: Progress | None = None, components: list[CompiledComponent] | None = None) -> ExportReport:
    """Build one width's output in `out_dir` (a staging folder); returns its report (also written as report.json)."""
    opts, config = run.options, ckpt.config
    pkg = opts.package
    with timer.stage("extract"):
        # views of the supernetwork, no copy (a 1.6B model is 5.5 GiB in fp32); palettization and distillation
        # replace parameters rather than writing into them, so the checkpoint stays intact for the next width
        dense = extract_width(ckpt.model, width, share=True)
    with timer.stage("rewrite"):
        deploy = deploy_model(dense, latent_hw=run.latents.package, query_chunk=pkg.query_chunk)
    compression = None
    if run.bits.palettized:
        compression = compress(ckpt, dense, deploy, width, opts.compression, run.compression, run.latents.compress,
                               pkg.query_chunk, timer, progress)
    # Swift resources: the Resources folder holds what the app loads; the verification-only sidecars stay beside it
    pkg_dir = out_dir / SWIFT_RESOURCES if pkg.resources else out_dir
    pkg_dir.mkdir(exist_ok=True)
    sidecars = write_sidecars(out_dir, compression.palettes if compression else None,
                              trained_state(deploy) if compression and compression.distill else None)
    if compression and compression.recipe:
        (out_dir / "recipe.json").write_text(dumps(compression.recipe.to_dict()) + "\n")
    ckpt_sha = sha256_file(ckpt.path / "model.safetensors") if ckpt.path else None
    meta = package_metadata(deploy, width=width, params=count_params(config, width), config=config.to_dict(), checkpoint_sha256=ckpt_sha,
                            bits=run.bits, bits_per_layer=compression.bits_per_layer if compression else None,
                            group_size=opts.compression.group_size if compression else None,
                            palettes_sha256=sidecars.palettes_sha256, distilled_sha256=sidecars.distilled_sha256)
    name = f"{SWIFT_DENOISER}{run.fmt.suffix}" if pkg.resources else package_name(config.name, width, run.bits, run.fmt)
    spec = PackageSpec(folder=pkg_dir, name=name, fmt=run.fmt, target=pkg.target, meta=meta,
                       palettes=compression.palettes if compression else None, chunks=pkg.chunks, more_latents=run.latents.more,
                       query_chunk=pkg.query_chunk, swift=pkg.resources)
    with timer.stage("convert"):
        written = write_package(deploy, dense, spec)
    warn_large_weight_files(written, width, pkg.chunks)
    verification = Verification()
    if opts.verification.verify:
        with timer.stage("verify"):
            verification = verify_written(written, ckpt, compression, run, out_dir, progress)
    if pkg.resources:
        write_swift_resources(pkg_dir, written.paths, deploy, written.chunks, written.graphs if run.latents.more else None,
                              unconditional=ckpt.prompts.null if ckpt.prompts is not None else None)
    component_reports = []
    if components:  # --pipeline: the text encoder, decoder, tokenizer and manifest beside the denoiser
        component_reports = write_components(components, pkg_dir, ckpt, ckpt_sha, written.path)
    relative = str(written.path.relative_to(out_dir))
    report = ExportReport(
        edgecompile=__version__, config=config.to_dict(), width=width, params=meta.params, latent=list(run.latents.package),
        bits=run.bits.value, format=run.fmt.value, target=str(pkg.target), checkpoint=str(ckpt.path) if ckpt.path else None,
        checkpoint_sha256=ckpt_sha, package=relative, torch_threads=torch.get_num_threads(), compression=compression,
        coremltools=written.converter, size_bytes=written.size_bytes, chunks=written.chunks, verify=verification.result,
        functions=verification.functions, components=component_reports, stage_seconds=dict(timer.seconds),
        stage_peak_memory_gib=dict(timer.peak_memory_gib),
    )
    (out_dir / REPORT_FILE).write_text(dumps(report.to_dict()) + "\n")
    report.path = str(opts.width_dir(width) / report.package)
    return report


def run_export(ckpt: Checkpoint, opts: ExportOptions, on_stage: Callable[[str], None] | None = None,
               progress: Progress | None = None) -> list[ExportReport]:
    """Every width in turn, staged together and committed together; the loaded checkpoint (and coremltools) are
    shared between widths. A verification below its bar raises VerificationFailed and ships nothing, unless
    `keep_failed`, which commits the outputs for inspection (report.json says so) and then raises.

    `on_stage` is told each stage as it starts and `progress` each step within one; without them nothing is
    printed (the CLI passes its display; `edgecompile.commands.progress.log_progress` logs plain lines)."""
    run = opts.resolve(ckpt)
    if run.fmt is Format.COREML:
        import_coremltools()  # before the first interruptible stage: its import swallows Ctrl-C
    if run.fmt is Format.AIMODEL:
        import_coreai()  # not installed: the one-line error now, before any work
    reports, failed = [], []
    components = None
    if opts.package.pipeline:  # the same for every width: converted and verified once
        timer = StageTimer(on_stage=on_stage, device=run.compression.device)
        with timer.stage("pipeline components"):
            components = compile_components(ckpt, str(opts.package.target), run.latents.package, on_stage=on_stage,
                                            img2img=opts.package.img2img, fmt=run.fmt, text_encoder_chunks=opts.package.text_encoder_chunks)
    with atomic_outputs([opts.width_dir(w) for w in opts.widths], force=opts.force, inputs=opts.inputs(ckpt)) as stages:
        for w, out_dir in zip(opts.widths, stages):
            torch.manual_seed(0)  # per width: a width's output does not depend on which widths came before
            timer = StageTimer(on_stage=(lambda s, w=w: on_stage(f"w{width_label(w)}: {s}")) if on_stage else None,
                               device=run.compression.device)
            report = export_width(ckpt, w, run, out_dir, timer, progress, components)
            reports.append(report)
            if report.verify is not None and not report.verify.passed:
                message = f"width {width_label(w)}: verification failed: {report.verify.problem}"
                if not opts.verification.keep_failed:
                    raise VerificationFailed(f"{message}; nothing was written (--keep-failed keeps the package for inspection)")
                failed.append(message)
    if failed:
        raise VerificationFailed("; ".join(failed) + f"; kept for inspection in {opts.output} (--keep-failed)")
    return reports


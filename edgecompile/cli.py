"""The `edgecompile` command. Every user error is one line on stderr and exit code 2; a failed verification is
one line and exit code 1; Ctrl-C and SIGTERM clean up alike and exit 130."""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edgecompile import __version__
from edgecompile.atomic import quiet_staging_unraisable, termination_as_interrupt
from edgecompile.bench.report import DEFAULT_DEVICES, BenchOptions, resolve_bench, run_bench
from edgecompile.compress.calibration import record_calibration
from edgecompile.compress.distill import DEFAULT_BUDGET_SECONDS, MAX_BUDGET_STEPS
from edgecompile.compress.recipe import DEFAULT_TARGET_BITS
from edgecompile.compress.palettize_model import DEFAULT_PALETTE_METHOD, PALETTE_METHODS
from edgecompile.compress.sensitivity import DEFAULT_MODE as DEFAULT_SWEEP_MODE
from edgecompile.compress.sensitivity import MODES as SWEEP_MODES
from edgecompile.coreml.package import CHUNK_PACKAGES, layout_ops_per_block, load_package, weight_census
from edgecompile.coreml.generate import SampleSettings
from edgecompile.coreml.verify import DEFAULT_MIN_PSNR_DB, GenerationSummary, VerifyResult, check_passed
from edgecompile.errors import EdgeCompileError
from edgecompile.export import (FORMATS, ExportOptions, SweepOptions, SweepSettings, resolve_sample, run_export, run_sample, run_sweep,
                                verify_every_function, verify_exported)
from edgecompile.export_report import ExportReport
from edgecompile.jsonutil import dumps
from edgecompile.model.checkpoint import init_checkpoint, load_checkpoint, load_config_or_checkpoint
from edgecompile.model.elastic import count_params
from edgecompile.model.importers import import_checkpoint
from edgecompile.model.device import DEVICE_CHOICES
from edgecompile.model.summary import summarize

console = Console(stderr=True)
out = Console()


class Number(click.ParamType):
    """A finite int or float within bounds; anything else is a one-line usage error naming the option."""

    def __init__(self, kind: type = float, min: float | None = None, max: float | None = None, min_open: bool = False):
        self.kind, self.min, self.max, self.min_open = kind, min, max, min_open
        self.name = "integer" if kind is int else "number"

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a{'' if self.kind is int else ' finite'} {'whole number' if self.kind is int else 'number'}", param, ctx)
        if self.kind is float and not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (v < self.min or (self.min_open and v == self.min)):
            self.fail(f"{value} must be {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        if self.max is not None and v > self.max:
            self.fail(f"{value} must be <= {self.max:g}", param, ctx)
        return v


POSITIVE_INT = Number(int, min=1)
NON_NEGATIVE_INT = Number(int, min=0)
FINITE = Number(float)
WIDTH = Number(float, min=0, max=1, min_open=True)


def parse_latent(text: str | None, option: str = "--latent") -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EdgeCompileError(f"{option} {text!r} is not HxW (e.g. {option} 8x8 or {option} 128x96)") from None
    if h < 1 or w < 1:
        raise EdgeCompileError(f"{option} {text!r} must have positive sides (e.g. {option} 8x8)")
    return h, w


def parse_latents(text: str | None) -> list[tuple[int, int]]:
    """--latent A[,B,...]: one size, or several for one multifunction package (the first is the default function)."""
    if text is None:
        return [None]
    return [parse_latent(part.strip()) for part in text.split(",")]


def emit_json(data) -> None:
    click.echo(dumps(data))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgecompile")
def cli() -> None:
    """Compile elastic efficient-DiT checkpoints into verified Core ML packages."""


@cli.command()
@click.argument("source", required=False)
@click.option("--latent", help="Latent size HxW for the token counts (default: the config's sample_size).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(source: str | None, latent: str | None, as_json: bool) -> None:
    """Parameters, weight bytes and tokens per stage of every width of a config or checkpoint.

    SOURCE is a YAML/JSON config or a checkpoint folder; the bundled default checkpoint when omitted.
    """
    config, ckpt = load_config_or_checkpoint(source)
    summary = summarize(config, ckpt, source, parse_latent(latent))
    if as_json:
        emit_json(summary.to_dict())
        return
    size, tokens = summary.latent, summary.tokens
    table = Table(title=f"{config.name}: latent {size[0]}x{size[1]}, tokens down/middle/up {tokens['down']}/{tokens['middle']}/{tokens['up']}")
    for col in ("width", "params", "fp16 weights", "hidden", "heads (q/kv)"):
        table.add_column(col, justify="right")
    for label, row in summary.widths.items():
        table.add_row(label, f"{row.params / 1e6:,.2f} M", f"{row.weight_bytes_fp16 / 2**20:,.1f} MiB", str(row.hidden),
                      f"{row.heads}/{row.kv_heads}")
    out.print(table)
    if ckpt is not None:
        out.print(f"checkpoint {ckpt.path} ({ckpt.dtype})")
        acc = ckpt.provenance.get("sample_accuracy")
        if acc:
            out.print("sample accuracy (20 Euler steps) " + "; ".join(f"width {w}: {accuracy_text(row)}" for w, row in acc.items()))


def accuracy_text(row: dict) -> str:
    """A width's sample accuracy from the provenance: one figure, or one per trained latent size."""
    if "accuracy_20_steps" in row:
        return f"{row['accuracy_20_steps']:.0%}"
    return ", ".join(f"{size} {r['accuracy_20_steps']:.0%}" for size, r in row.items())


@cli.command()
@click.argument("config_path", metavar="CONFIG")
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint folder to write.")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE_INT, help="Initialisation seed.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--force", is_flag=True, help="Replace an existing output.")
def init(config_path: str, output: str, seed: int, dtype: str, force: bool) -> None:
    """Write a randomly initialised checkpoint of CONFIG (to try an architecture or scale before training)."""
    params = init_checkpoint(config_path, output, seed, dtype, force)
    console.print(f"wrote {output} ({params / 1e6:,.2f} M parameters, seed {seed})")


@cli.command("import")
@click.argument("source", metavar="PATH")
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint folder to write.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Storage dtype of the written checkpoint (the source may be fp32, fp16 or bf16).")
@click.option("--text-len", type=POSITIVE_INT,
              help="Text tokens the packages take (default: the pipelines' max_sequence_length, 120 for PixArt-alpha, 300 for Sigma).")
@click.option("--name", help="Model name used in package names (default: the family, e.g. pixart).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def import_(source: str, output: str, dtype: str, text_len: int | None, name: str | None, force: bool) -> None:
    """Import a public checkpoint in the diffusers layout (PixArt-alpha / PixArt-Sigma transformer folder, or a
    pipeline folder holding transformer/) as an edgecompile checkpoint. Reads JSON and safetensors only."""
    path = import_checkpoint(source, output, dtype=dtype, text_len=text_len, name=name, force=force)
    ckpt = load_checkpoint(path)
    c = ckpt.config
    console.print(f"wrote {path}: {c.name}, {count_params(c, 1.0) / 1e6:,.2f} M parameters, {c.depth_middle} blocks, hidden {c.hidden_dim}, "
                  f"latent {c.sample_size[0]}x{c.sample_size[1]}, text {c.text_len}x{c.text_dim}, {c.prediction} prediction"
                  + (", micro-conditions" if c.micro_conditions else ""))
    if ckpt.provenance.get("import", {}).get("learned_sigma_dropped"):
        console.print("the learned-sigma (variance) output channels were dropped: packages predict the noise only")


class StageProgress:
    """A rich progress display: one line per pipeline stage, with a bar for stages that report progress."""

    def __init__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        # elapsed, then the estimate of what remains (rich extrapolates from the stage's own rate)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.stage = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._finish()
        return self.progress.__exit__(*exc)

    def _finish(self):
        if self.task is not None:
            t = self.progress.tasks[self.task]
            self.progress.update(self.task, total=t.total or 1, completed=t.total or 1)

    def on_stage(self, name: str) -> None:
        self._finish()
        self.stage = name
        self.task = self.progress.add_task(name, total=None)

    def update(self, description: str, done: int, total: int) -> None:
        if self.task is None:
            self.on_stage(description)
        self.progress.update(self.task, description=f"{self.stage}: {description}", completed=done, total=total)


def parse_int_list(text: str, option: str, minimum: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise EdgeCompileError(f"{option} {text!r} is not a comma list of whole numbers (e.g. 4,8)") from None
    if minimum is not None and values[0] < minimum:
        raise EdgeCompileError(f"{option} {text!r}: every value must be >= {minimum}")
    return values


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--width", "width_text", help="0.375, 0.5, 1.0, a comma list, or 'all' (default: 0.5, or the checkpoint's only width).")
@click.option("--bits", default="16", show_default=True, help="Weight bits: 16 (fp16), 8, 6, 4 or mixed (sensitivity sweep).")
@click.option("-o", "--output", default="dist", show_default=True, type=click.Path(), help="Output folder (one subfolder per width).")
@click.option("--latent", help="Latent size HxW (default: the config's sample_size); several, comma-separated (8x8,16x16), "
                               "make one multifunction package per width (iOS18), one function per size, the first the default.")
@click.option("--target", default="iOS17", show_default=True, type=click.Choice(["iOS17", "iOS18"]))
@click.option("--format", "fmt", default="coreml", show_default=True, type=click.Choice(FORMATS))
@click.option("--recipe", type=click.Path(), help="Mixed-bit recipe from `edgecompile sweep` (skips the sweep).")
@click.option("--target-bits", default=DEFAULT_TARGET_BITS, show_default=True, type=FINITE, help="Average bits for --bits mixed.")
@click.option("--candidates", default="4,8", show_default=True, help="Bit-widths --bits mixed chooses from.")
@click.option("--sweep-mode", default=DEFAULT_SWEEP_MODE, show_default=True, type=click.Choice(SWEEP_MODES), help="Sensitivity signal for --bits mixed.")
@click.option("--palettes", "palette_method", default=DEFAULT_PALETTE_METHOD, show_default=True, type=click.Choice(PALETTE_METHODS),
              help="output-aware: LUTs weighted by output damage, error-compensating indices; weighted: nearest indices; plain: k-means on weights alone.")
@click.option("--group-size", type=POSITIVE_INT, help="One LUT per group of this many output channels (iOS18).")
@click.option("--calibration", type=click.Path(), help="Calibration inputs from `edgecompile calibrate` (default: built from the checkpoint).")
@click.option("--no-distill", is_flag=True, help="Skip self-distillation of biases and norms after palettization.")
@click.option("--distill-steps", type=NON_NEGATIVE_INT,
              help="A fixed, reproducible number of self-distillation steps (early stop on plateau); default: --distill-budget.")
@click.option("--distill-budget", type=Number(float, min=0, min_open=True),
              help=f"Minutes of self-distillation per width (default {DEFAULT_BUDGET_SECONDS / 60:g}): the measured step time "
                   f"sets the step count (at most {MAX_BUDGET_STEPS}; early stop on plateau).")
@click.option("--swift-resources", is_flag=True, help="Lay the output out as the Swift Core ML pipelines expect (Resources/).")
@click.option("--query-chunk", type=POSITIVE_INT, help="Split attention queries into chunks of this many tokens.")
@click.option("--chunks", default=1, show_default=True, type=POSITIVE_INT,
              help="Cut the denoiser into this many packages at block boundaries (each weight file under the Neural Engine's 2 GiB).")
@click.option("--calibration-latent",
              help="Latent HxW for calibration, sweep and distillation (default: --latent); the package and its verification stay at --latent.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES),
              help="Where calibration, the sweep and self-distillation run (auto: CUDA, then MPS, then CPU; fp32 everywhere).")
@click.option("--batch-size", type=POSITIVE_INT, help="Inference batch of the sweep and teacher outputs (default: what the device's free memory holds).")
@click.option("--no-verify", is_flag=True, help="Skip executing the package against the checkpoint.")
@click.option("--no-generate", is_flag=True, help="Skip sampling through the package in verification (checkpoints that ship prompts).")
@click.option("--min-psnr", default=DEFAULT_MIN_PSNR_DB, show_default=True, type=FINITE, help="Verification bar (dB against edgecompile's simulation).")
@click.option("--keep-failed", is_flag=True, help="Keep a package whose verification failed, for inspection (still exits 1).")
@click.option("--force", is_flag=True, help="Replace existing output folders.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def export(checkpoint, width_text, bits, output, latent, target, fmt, recipe, target_bits, candidates, sweep_mode, palette_method, group_size,
           calibration, no_distill, distill_steps, distill_budget, swift_resources, query_chunk, chunks, calibration_latent, device,
           batch_size, no_verify, no_generate, min_psnr, keep_failed, force, as_json):
    """Compile CHECKPOINT (default: the bundled one) into one verified package per width.

    Pipeline, in the order it runs: load and validate -> extract width -> rewrite -> calibrate -> layer statistics
    -> sweep (or --recipe) -> palettize -> self-distill -> convert -> verify -> package. A package that verifies below
    --min-psnr is not written (exit 1).
    """
    ckpt = load_checkpoint(checkpoint)
    latents = parse_latents(latent)
    opts = ExportOptions(
        output=Path(output), widths=ckpt.config.parse_widths(width_text or repr(ckpt.config.default_width)), bits=str(bits),
        latent_hw=latents[0], more_latents=tuple(latents[1:]),
        target=target, fmt=fmt, force=force, verify=not no_verify, query_chunk=query_chunk, chunks=chunks, device=device,
        batch_size=batch_size, calibration_latent=parse_latent(calibration_latent, "--calibration-latent"), recipe=Path(recipe) if recipe else None,
        sweep=SweepSettings(candidates=parse_int_list(candidates, "--candidates"), mode=sweep_mode, target_bits=target_bits),
        palettes=palette_method, group_size=group_size, calibration=Path(calibration) if calibration else None,
        distill=not no_distill, distill_steps=distill_steps, distill_budget_minutes=distill_budget, swift_resources=swift_resources,
        min_psnr_db=min_psnr, keep_failed=keep_failed, generate=not no_generate,
    )
    with StageProgress() as display:
        reports = run_export(ckpt, opts, on_stage=display.on_stage, progress=display.update)
    if as_json:
        emit_json({"packages": [{**r.to_dict(), "path": r.path} for r in reports]})
        return
    print_summary(ckpt.config.name, reports)


def print_summary(name: str, reports: list[ExportReport]) -> None:
    """A per-width table that fits 80 columns, then each width's package path and stage times on their own lines."""
    table = Table(title=f"edgecompile export: {name}")
    for col in ("width", "params", "size", "avg bits", "held-out PSNR", "vs ckpt"):
        table.add_column(col, justify="right")
    for r in reports:
        psnr = f"{r.verify.psnr_vs_checkpoint_db:.1f} dB" if r.verify and math.isfinite(r.verify.psnr_vs_checkpoint_db) else "-"
        held = r.compression.heldout_psnr_db if r.compression else {}
        held_text = " -> ".join(f"{held[k]:.1f}" for k in ("palettized", "distilled") if k in held) + " dB" if held else "-"
        table.add_row(f"{r.width:g}", f"{r.params / 1e6:.2f} M", f"{r.size_bytes / 2**20:.2f} MiB", f"{r.average_bits:.2f}", held_text, psnr)
    out.print(table)
    for r in reports:
        out.print(f"w{r.width:g}: {r.path}", overflow="fold")
        out.print("  " + ", ".join(f"{k} {sec:.1f}s" for k, sec in r.stage_seconds.items()), overflow="fold")


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--width", type=WIDTH, help="Width (default: 0.5, or the checkpoint's only width).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Calibration file to write (.safetensors).")
@click.option("--prompts", type=click.Path(), help="Your text embeddings: safetensors with 'tokens' (N, T, D), optional 'null'.")
@click.option("--schedules", default="4,20", show_default=True, help="Sampling step counts whose trajectories are recorded.")
@click.option("--latent", help="Latent size HxW (default: the config's sample_size).")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE_INT)
@click.option("--cfg", "cfg_scale", default=2.0, show_default=True, type=Number(float, min=0), help="Classifier-free guidance scale of the app.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES),
              help="Where the torch work runs (auto: CUDA, then MPS, then CPU).")
@click.option("--force", is_flag=True)
def calibrate(checkpoint, width, output, prompts, schedules, latent, seed, cfg_scale, device, force):
    """Record calibration inputs along the unquantized model's own sampling trajectories."""
    steps = parse_int_list(schedules, "--schedules", minimum=1)
    ckpt = load_checkpoint(checkpoint)
    width = ckpt.config.default_width if width is None else width
    calib = record_calibration(ckpt, width, output, prompts, steps, parse_latent(latent), seed, cfg_scale, force, device)
    console.print(f"wrote {output}: {len(calib)} inputs (width {width:g}, schedules {list(steps)}, seed {seed})")


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--width", type=WIDTH, help="Width (default: 0.5, or the checkpoint's only width).")
@click.option("--bits", "bits_text", default="4,8", show_default=True, help="Candidate bit-widths.")
@click.option("--mode", default=DEFAULT_SWEEP_MODE, show_default=True, type=click.Choice(SWEEP_MODES),
              help="propagated: predicted denoiser-output error (a forward pass, a backward pass on a third); local: each layer's "
                   "own output error (one forward pass); e2e: denoiser-output error (one pass per layer and bits).")
@click.option("--palettes", "palette_method", default=DEFAULT_PALETTE_METHOD, show_default=True, type=click.Choice(PALETTE_METHODS),
              help="How each candidate's LUT and indices are chosen (see export --palettes).")
@click.option("--target-bits", type=FINITE, help=f"Average bits to allocate (default {DEFAULT_TARGET_BITS} unless --target-psnr).")
@click.option("--target-psnr", type=FINITE, help="Allocate the fewest bits whose calibration PSNR reaches this (dB).")
@click.option("--group-size", type=POSITIVE_INT, help="Sweep grouped LUTs of this many output channels.")
@click.option("--calibration", type=click.Path(), help="Calibration file (default: built from the checkpoint).")
@click.option("--latent", help="Latent HxW of the calibration built when no --calibration is given (default: sample_size).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES),
              help="Where the torch work runs (auto: CUDA, then MPS, then CPU).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Recipe JSON to write.")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def sweep(checkpoint, width, bits_text, mode, palette_method, target_bits, target_psnr, group_size, calibration, latent, device, output, force, as_json):
    """Per-layer palettization sensitivity and a mixed-bit recipe for one width."""
    if target_bits is not None and target_psnr is not None:
        raise EdgeCompileError("give --target-bits or --target-psnr, not both")
    candidates = parse_int_list(bits_text, "--bits")
    settings = SweepSettings(candidates=candidates, mode=mode, target_bits=DEFAULT_TARGET_BITS if target_bits is None else target_bits,
                             target_psnr_db=target_psnr)
    ckpt = load_checkpoint(checkpoint)
    width = ckpt.config.default_width if width is None else width
    opts = SweepOptions(output=Path(output), width=width, settings=settings, palettes=palette_method, group_size=group_size,
                        calibration=Path(calibration) if calibration else None, latent_hw=parse_latent(latent), device=device, force=force)
    with StageProgress() as display:
        recipe = run_sweep(ckpt, opts, on_stage=display.on_stage, progress=display.update)
    if as_json:
        emit_json({"recipe": str(output), **{k: v for k, v in recipe.to_dict().items() if k != "layers"}})
        return
    table = Table(title=f"{mode} sweep, width {width:g}: {recipe.average_bits:.3f} bits on average, predicted PSNR {recipe.predicted_psnr_db:.1f} dB")
    for col in ("layer", "size", *(f"sens. {b}-bit" for b in candidates), "bits"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    order = sorted(recipe.bits, key=lambda n: -recipe.sensitivity[n][min(candidates)])
    for n in order[:15]:
        table.add_row(n, f"{recipe.sizes[n]:,}", *(f"{recipe.sensitivity[n][b]:.3g}" for b in candidates), str(recipe.bits[n]))
    out.print(table)
    out.print(f"{len(order)} layers (15 most sensitive shown); sweep cost {recipe.sweep['cost_forward_passes']:.1f} forward passes "
              f"+ {recipe.sweep['kmeans_seconds']:.1f} s of k-means; wrote {output}")


@cli.command()
@click.argument("package", type=click.Path())
@click.option("--function", help="One function of a multifunction package (default: its default function).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(package, function, as_json):
    """Op counts, layout ops per block, I/O, metadata and weight bytes of a saved .mlpackage (works on Linux)."""
    view = load_package(package, function=function)
    census = weight_census(view)
    data = {
        "package": str(view.path), "function": view.function, "functions": view.functions,
        "inputs": view.inputs, "outputs": view.outputs, "metadata": view.metadata,
        "ops": view.ops, "layout_ops_per_block": layout_ops_per_block(view), **census,
    }
    if as_json:
        emit_json(data)
        return
    meta = view.metadata
    out.print(f"[bold]{view.path}[/bold]  width {meta.get('edgecompile.width', '?')}, bits {meta.get('edgecompile.bits', '?')}, "
              f"latent {'x'.join(map(str, view.latent_hw or ('?',)))}, {census['weight_bytes'] / 2**20:.2f} MiB of weights"
              + (f", {census['average_bits']:.2f} bits/weight palettized" if census["average_bits"] else ""))
    if view.functions:
        out.print(f"multifunction package: {', '.join(f'{n} ({hw})' for n, hw in view.functions.items())}; the first is the default; "
                  f"showing {view.function} (--function to pick another)", overflow="fold")
    if view.chunk:
        out.print(f"chunk {view.chunk[0]} of {view.chunk[1]} of one denoiser: run in the order of "
                  f"{meta.get(CHUNK_PACKAGES)} (denoiser_contract.json says how tensors bind)", overflow="fold")
    io_table = Table(title="inputs / outputs")
    for col in ("kind", "name", "shape", "dtype", "meaning"):
        io_table.add_column(col)
    for kind, feats in (("input", view.inputs), ("output", view.outputs)):
        for f in feats:
            io_table.add_row(kind, f["name"], "x".join(map(str, f["shape"])), f["dtype"], f["description"])
    out.print(io_table)
    ops_table = Table(title="ops")
    ops_table.add_column("op")
    ops_table.add_column("count", justify="right")
    for k, v in view.ops.items():
        ops_table.add_row(k, str(v))
    out.print(ops_table)
    lay = Table(title="layout ops per transformer block")
    for col in ("block", "transpose", "reshape"):
        lay.add_column(col, justify="right")
    for blk, counts in data["layout_ops_per_block"].items():
        lay.add_row(blk, str(counts["transpose"]), str(counts["reshape"]))
    out.print(lay)


@cli.command()
@click.argument("package", type=click.Path())
@click.option("--checkpoint", type=click.Path(), help="The checkpoint it was exported from (default: the bundled one).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Interpreter arithmetic: fp32 proves the graph; fp16 predicts device numerics.")
@click.option("--runtime", default="auto", show_default=True, type=click.Choice(["auto", "coreml", "interpreter"]))
@click.option("--min-psnr", default=DEFAULT_MIN_PSNR_DB, show_default=True, type=FINITE, help="The bar: PSNR (dB) below it fails (exit 1).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES),
              help="Where the torch references run (auto: CUDA, then MPS, then CPU).")
@click.option("--function", help="Verify one function of a multifunction package (default: every function).")
@click.option("--generate", is_flag=True, help="Also sample through the package with the checkpoint's prompts (final-sample PSNR, digit accuracy).")
@click.option("--steps", default=4, show_default=True, type=POSITIVE_INT, help="--generate: sampler steps.")
@click.option("--cfg", "cfg_scale", default=2.0, show_default=True, type=Number(float, min=1), help="--generate: guidance scale.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(package, checkpoint, precision, runtime, min_psnr, device, function, generate, steps, cfg_scale, as_json):
    """Execute PACKAGE (.mlpackage or .onnx) and compare it with edgecompile's simulation of its checkpoint and
    width (PSNR). Exits 1 when the PSNR is below --min-psnr or an output is not finite."""
    settings = dict(checkpoint=checkpoint, precision=precision, runtime=runtime, min_psnr_db=min_psnr, device=device,
                    generate_with=SampleSettings(steps=steps, cfg_scale=cfg_scale) if generate else None)
    results = [verify_exported(package, function=function, **settings)] if function else verify_every_function(package, **settings)
    if as_json:  # one result, or one per function of a multifunction package
        emit_json(results[0].to_dict() if len(results) == 1 else {"functions": [r.to_dict() for r in results]})
    else:
        for result in results:
            print_verify(package if result.function is None else f"{package} [{result.function}]", result, min_psnr)
    for result in results:
        check_passed(result)


def print_verify(package: str, result: VerifyResult, min_psnr: float) -> None:
    fmt = lambda v: "NaN" if not math.isfinite(v) else f"{v:.1f}"  # noqa: E731
    out.print(f"{package}: width {result.width:g}, {result.runtime}: PSNR {fmt(result.psnr_db)} dB vs {result.reference}"
              + ("" if result.psnr_db == result.psnr_vs_checkpoint_db else f", {fmt(result.psnr_vs_checkpoint_db)} dB vs the unquantized checkpoint")
              + (f"; chunks alone: {', '.join(fmt(v) for v in result.chunk_psnr_db)} dB" if result.chunk_psnr_db else "")
              + (f"; passed (>= {min_psnr:g} dB)" if result.passed else ""))
    if result.generation is not None:
        out.print(generation_line(result.generation))


def generation_line(g: GenerationSummary) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    line = f"{len(g.labels)} samples, {g.steps} steps, CFG {g.cfg_scale:g} ({g.runtime}, {g.seconds:.0f} s)"
    if g.psnr_db is not None:
        line += f": final samples {fmt(g.psnr_db)} dB vs the checkpoint's (worst {fmt(g.worst_sample_psnr_db)} dB)"
    if g.package_accuracy is not None:
        line += f"; digits classified right: package {g.package_accuracy:.0%}"
        if g.checkpoint_accuracy is not None:
            line += f", checkpoint {g.checkpoint_accuracy:.0%}"
    return line


@cli.command()
@click.argument("package", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The PNG grid to write.")
@click.option("--checkpoint", type=click.Path(), help="The checkpoint it was exported from (default: the bundled one).")
@click.option("--prompt", "labels", multiple=True, help="A prompt of the checkpoint by label (digits: 0..9); repeat it; default: all.")
@click.option("--prompts", "prompts_file", type=click.Path(), help="Your text embeddings instead: safetensors with 'tokens' (N, T, D) and 'null'.")
@click.option("--steps", default=4, show_default=True, type=POSITIVE_INT, help="Sampler steps (Euler for flow models, DDIM for epsilon).")
@click.option("--cfg", "cfg_scale", default=2.0, show_default=True, type=Number(float, min=1), help="Classifier-free guidance scale (1: off).")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE_INT, help="Noise seed.")
@click.option("--per-prompt", default=1, show_default=True, type=POSITIVE_INT, help="Samples per prompt.")
@click.option("--function", help="One function (latent size) of a multifunction package (default: its default function).")
@click.option("--compare", is_flag=True, help="Add the checkpoint's own samples from the same noise (and their PSNR).")
@click.option("--runtime", default="auto", show_default=True, type=click.Choice(["auto", "coreml", "interpreter"]),
              help="auto: Core ML on macOS, else the interpreter in fp16.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES), help="Where --compare's checkpoint runs.")
@click.option("--force", is_flag=True, help="Replace an existing PNG.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def sample(package, output, checkpoint, labels, prompts_file, steps, cfg_scale, seed, per_prompt, function, compare, runtime, device, force,
           as_json):
    """Run the app's sampling loop with PACKAGE as the denoiser and write the samples as a labelled PNG grid."""
    job = resolve_sample(package, output, checkpoint, list(labels) or None, prompts_file,
                         SampleSettings(steps=steps, cfg_scale=cfg_scale, seed=seed, per_prompt=per_prompt), compare=compare,
                         runtime=runtime, device=device, force=force, function=function)
    with StageProgress() as display:
        display.on_stage("sample")
        summary = run_sample(job, progress=display.update)
    if as_json:
        emit_json(summary.to_dict())
        return
    out.print(f"{output}: " + generation_line(summary))


@cli.command()
@click.argument("packages", nargs=-1, type=click.Path())
@click.option("--config", "configs", multiple=True, type=click.Path(), help="Also analyse a config (not exported), e.g. recipes/snapgenpp.yaml.")
@click.option("--width", "config_widths", default="all", show_default=True, help="Widths of --config: a comma list or 'all'.")
@click.option("--latent", help="Latent HxW for --config (default: its sample_size).")
@click.option("--bits", "config_bits", default=16.0, show_default=True, type=Number(float, min=1, max=32), help="Weight bits assumed for --config.")
@click.option("--device", "devices", multiple=True, help="Cost-model profile(s) in recipes/devices (default: iphone16promax, iphone12).")
@click.option("--runs", multiple=True, type=click.Path(), help="Measured runs from other machines (JSON, documented format) to merge.")
@click.option("--reports", "export_reports", multiple=True, type=click.Path(), help="Export report.json files, for the PSNR-vs-size plot.")
@click.option("--no-host", is_flag=True, help="Skip measuring the torch deploy graph on this host.")
@click.option("--host-latent", help="Latent HxW for host timing of --config models (reduce it for paper-scale models on a laptop CPU).")
@click.option("--repeats", default=10, show_default=True, type=POSITIVE_INT, help="Timed runs after warm-up.")
@click.option("-o", "--output", type=click.Path(), help="Report folder (report.md, report.html, PNG plots, bench.json).")
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
@click.option("--json", "as_json", is_flag=True)
def bench(packages, configs, config_widths, latent, config_bits, devices, runs, export_reports, no_host, host_latent, repeats, output,
          force, as_json):
    """Latency report: static analysis, host timing, Core ML timing (macOS) and device cost-model estimates."""
    opts = BenchOptions(packages=list(packages), configs=list(configs), config_widths=config_widths, latent=parse_latent(latent),
                        config_bits=config_bits, devices=tuple(devices) or DEFAULT_DEVICES, runs=list(runs),
                        export_reports=list(export_reports), host=not no_host, host_latent=parse_latent(host_latent),
                        repeats=repeats, output=Path(output) if output else None, force=force)
    inputs = resolve_bench(opts)  # every input read and checked before the progress display starts
    with StageProgress() as display:
        display.on_stage("bench")
        data = run_bench(opts, inputs, progress=display.update)
    if as_json:
        emit_json(data)
        return
    table = Table(title="edgecompile bench (estimates are cost-model estimates, not measurements)")
    devs = list(data["cost_model"]["devices"])
    for col in ("item", "params", "weights", "GMACs", "attention %", "ops", *(f"est. {d}" for d in devs), "host (measured)"):
        table.add_column(col, justify="left" if col == "item" else "right")
    for r in data["items"]:
        s = r["static"]
        attn = sum(v for k, v in s["macs"].items() if k.startswith("attn")) / max(s["total_macs"], 1)
        host = f"{r['host']['median_ms']:.1f} ms" if "host" in r else "-"
        table.add_row(r["item"], f"{r['params'] / 1e6:.1f} M", f"{r['weight_bytes'] / 2**20:.1f} MiB", f"{s['total_macs'] / 1e9:.2f}",
                      f"{100 * attn:.0f}", str(s["ops"]), *(f"{r['estimates_ms'][d]:.0f} ms" for d in devs), host)
    out.print(table)
    cm = data["cost_model"]
    out.print(f"cost model ({devs[0]}): worst calibration error {cm['calibration_error_pct']}%, worst validation error "
              f"{cm['validation_error_pct']}% on the Fig. 3 ablations" + (f"; report in {output}" if output else ""))


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class _NoteHandler(logging.Handler):
    """The library's warnings (a stale staging folder removed, an old output that could not be deleted)."""

    def emit(self, record):
        click.echo(f"edgecompile: note: {one_line(record.getMessage())}", err=True)


def main(argv: list[str] | None = None) -> None:
    sys.unraisablehook = quiet_staging_unraisable

    logger = logging.getLogger("edgecompile")
    if not any(isinstance(h, _NoteHandler) for h in logger.handlers):
        logger.addHandler(_NoteHandler())
        logger.propagate = False
    try:
        with termination_as_interrupt():
            cli.main(args=argv, prog_name="edgecompile", standalone_mode=False)
    except EdgeCompileError as e:
        click.echo(f"edgecompile: error: {one_line(e)}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("edgecompile: interrupted; nothing was written", err=True)
        if argv is None:
            # As the process's entry point, leave with 130 for certain: CPython ends a process by SIGINT (status -2)
            # when a KeyboardInterrupt ever crossed an exec() of source (dataclasses, during an import), even once
            # handled. Every cleanup has run by now (the staging folders' context managers have exited).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(130)
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "edgecompile"
        click.echo(f"edgecompile: error: {one_line(e.format_message())} (see '{command} --help')", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"edgecompile: error: {one_line(e.format_message())}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo("edgecompile: error: out of memory: use a smaller --latent or width, or a machine with more memory", err=True)
        sys.exit(2)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            click.echo(f"edgecompile: error: no space left on the device{f' writing {e.filename}' if e.filename else ''}: "
                       "free some space or choose another output; nothing was written", err=True)
        else:
            click.echo(f"edgecompile: error: {one_line(e.strerror or e)}{f': {e.filename}' if e.filename else ''}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

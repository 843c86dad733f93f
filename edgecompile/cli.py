"""The `edgecompile` command: it parses options into the commands' typed option groups and prints their typed
results (edgecompile/commands/render.py builds the tables). Every user error is one line on stderr and exit
code 2; a failed verification is one line and exit code 1; Ctrl-C and SIGTERM clean up alike and exit 130."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from edgecompile import __version__
from edgecompile.atomic import quiet_staging_unraisable, termination_as_interrupt
from edgecompile.cli_params import (FINITE, NON_NEGATIVE_INT, POSITIVE_INT, SEED, WIDTH, AliasedOption, Number, choice, parse_int_list,
                                    parse_latent, parse_latents)
from edgecompile.bench.report import DEFAULT_DEVICES, BenchOptions, resolve_bench, run_bench
from edgecompile.choices import Bits, Device, Format, PaletteMethod, Precision, Runtime, StorageDtype, SweepMode, Target
from edgecompile.commands import render
from edgecompile.commands.export import run_export
from edgecompile.commands.options import CompressionOptions, ExportOptions, LatentPlan, PackageOptions, SweepSettings, VerificationOptions
from edgecompile.commands.progress import stage_display
from edgecompile.commands.sample import SampleOptions, TextToImageOptions, is_pipeline_folder, run_sample, run_text_to_image
from edgecompile.commands.sweep import SweepOptions, run_sweep
from edgecompile.commands.verify import verify_every_function, verify_exported
from edgecompile.compress.calibration import record_calibration
from edgecompile.compress.distill import DEFAULT_BUDGET_SECONDS, DEFAULT_STEPS, MAX_BUDGET_STEPS
from edgecompile.compress.palettize_model import DEFAULT_PALETTE_METHOD
from edgecompile.compress.recipe import DEFAULT_TARGET_BITS
from edgecompile.compress.sensitivity import DEFAULT_MODE as DEFAULT_SWEEP_MODE
from edgecompile.coreml.generate import SampleSettings
from edgecompile.coreml.package import layout_ops_per_block, load_package, weight_census
from edgecompile.coreml.verify import DEFAULT_MIN_PSNR_DB, check_passed
from edgecompile.errors import EdgeCompileError
from edgecompile.jsonutil import dumps
from edgecompile.model.checkpoint import checkpoint_config, init_checkpoint, load_checkpoint, load_config_or_checkpoint
from edgecompile.model.elastic import count_params
from edgecompile.model.importers import import_checkpoint
from edgecompile.model.summary import summarize

console = Console(stderr=True)
out = Console()
def emit_json(data) -> None:
    click.echo(dumps(data))


def print_lines(lines: list[str]) -> None:
    """Plain lines, never cut: the terminal wraps them (soft wrap), so a name copied from one is whole."""
    for line in lines:
        out.print(line, soft_wrap=True, highlight=False, markup=False)


FORCE_HELP = "Replace an existing output (default: refuse to overwrite)."
JSON_HELP = "Print a machine-readable summary instead of tables."
DEVICE_HELP = "Where the torch work runs (auto: CUDA, then MPS, then CPU)."
RUNTIME_HELP = "What executes the package: auto (Core ML on macOS, else the MIL interpreter), coreml, or interpreter."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="edgecompile")
def cli() -> None:
    """Compile elastic efficient-DiT checkpoints into verified Core ML packages."""


@cli.command()
@click.argument("source", required=False)
@click.option("--latent", help="Latent size HxW for the token counts (default: the config's sample_size).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def info(source: str | None, latent: str | None, as_json: bool) -> None:
    """Parameters, weight bytes and tokens per stage of every width of a config or checkpoint.

    SOURCE is a checkpoint folder, a YAML/JSON config, or the name of a shipped config (snapgenpp, toy); the
    bundled default checkpoint when omitted.
    """
    config, ckpt = load_config_or_checkpoint(source)
    summary = summarize(config, ckpt, source, parse_latent(latent))
    if as_json:
        emit_json(summary.to_dict())
        return
    out.print(render.info_table(config, summary))
    print_lines(render.info_lines(config, ckpt))


@cli.command()
@click.argument("config_path", metavar="CONFIG")
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint folder to write.")
@click.option("--seed", default=0, type=SEED, help="Initialisation seed.")
@click.option("--dtype", default="float32", type=choice(StorageDtype), help="Storage dtype of the written weights.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def init(config_path: str, output: str, seed: int, dtype: str, force: bool) -> None:
    """Write a randomly initialised checkpoint of CONFIG (a file, or a shipped name such as snapgenpp), to try an
    architecture or scale before training."""
    params = init_checkpoint(config_path, output, seed, dtype, force)
    console.print(f"wrote {output} ({params / 1e6:,.2f} M parameters, seed {seed})")


@cli.command("import")
@click.argument("source", metavar="PATH")
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint folder to write.")
@click.option("--dtype", default="float32", type=choice(StorageDtype),
              help="Storage dtype of the written checkpoint (the source may be fp32, fp16 or bf16).")
@click.option("--text-len", type=POSITIVE_INT,
              help="Text tokens the packages take (default: the pipelines' max_sequence_length, 120 for PixArt-alpha, 300 for Sigma).")
@click.option("--name", help="Model name used in package names (default: the family, e.g. pixart).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
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


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--width", "width_text", help="0.375, 0.5, 1.0, a comma list, or 'all' (default: 0.5, or the checkpoint's only width).")
@click.option("--bits", default="16", type=choice(Bits), help="Weight bits: 16 (fp16), 8, 6, 4 or mixed (sensitivity sweep).")
@click.option("-o", "--output", default="dist", type=click.Path(), help="Output folder (one subfolder per width).")
@click.option("--latent", help="Latent size HxW (default: the config's sample_size); several, comma-separated (8x8,16x16), "
                               "make one multifunction package per width (iOS18), one function per size, the first the default.")
@click.option("--target", default=Target.IOS17.value, type=choice(Target),
              help="Core ML deployment target (iOS18: grouped LUTs, multifunction packages).")
@click.option("--format", "fmt", default=Format.COREML.value, type=choice(Format), help="Package format: Core ML (.mlpackage), ONNX (fp32) or Core AI "
              "(.aimodel; pip install 'edgecompile[coreai]').")
@click.option("--recipe", type=click.Path(), help="Mixed-bit recipe from `edgecompile sweep` (skips the sweep).")
@click.option("--target-bits", default=DEFAULT_TARGET_BITS, type=FINITE, help="Average bits for --bits mixed.")
@click.option("--candidates", default="4,8", help="Bit-widths --bits mixed chooses from.")
@click.option("--sweep-mode", default=DEFAULT_SWEEP_MODE.value, type=choice(SweepMode), help="Sensitivity signal for --bits mixed.")
@click.option("--palettes", "palette_method", default=DEFAULT_PALETTE_METHOD.value, type=choice(PaletteMethod),
              help="output-aware: LUTs weighted by output damage, error-compensating indices; weighted: nearest indices; plain: k-means on weights alone.")
@click.option("--group-size", type=POSITIVE_INT, help="One LUT per group of this many output channels (iOS18; default: one LUT per layer).")
@click.option("--calibration", type=click.Path(), help="Calibration inputs from `edgecompile calibrate` (default: built from the checkpoint).")
@click.option("--no-distill", is_flag=True, help="Skip self-distillation of biases and norms after palettization.")
@click.option("--distill-steps", type=NON_NEGATIVE_INT,
              help=f"A fixed, reproducible number of self-distillation steps (default {DEFAULT_STEPS}, fewer where they would not "
                   f"fit {DEFAULT_BUDGET_SECONDS / 60:g} minutes).")
@click.option("--distill-budget", type=Number(float, min=0, min_open=True),
              help="Minutes of self-distillation per width, evaluations included, instead of a step count: the stage re-plans as "
                   f"it runs and stops at the budget (at most {MAX_BUDGET_STEPS} steps).")
@click.option("--swift-resources", is_flag=True, help="Lay the output out as the Swift Core ML pipelines expect (Resources/).")
@click.option("--pipeline", is_flag=True, help="Also compile the checkpoint's text encoder and VAE decoder, copy its tokenizer and write "
                                               "pipeline.json, all in Resources/ (the checkpoint needs text_encoder/, tokenizer/, vae/).")
@click.option("--text-encoder-chunks", type=Number(int, min=1, max=64), help="With --pipeline: cut the text encoder into this many "
              "packages (default: as many as keep each weight file under the Neural Engine's 2 GiB; T5-XXL needs 3 at 8 bits).")
@click.option("--img2img", is_flag=True, help="With --pipeline: also compile the VAE encoder (VAEEncoder.mlpackage), for image-to-image.")
@click.option("--query-chunk", type=POSITIVE_INT, help="Split attention queries into chunks of this many tokens (default: no split).")
@click.option("--chunks", default=1, type=POSITIVE_INT,
              help="Cut the denoiser into this many packages at block boundaries (each weight file under the Neural Engine's 2 GiB).")
@click.option("--calibration-latent",
              help="Latent HxW for calibration, sweep and distillation (default: --latent); the package and its verification stay at --latent.")
@click.option("--device", default=Device.AUTO.value, type=choice(Device),
              help="Where calibration, the sweep and self-distillation run (auto: CUDA, then MPS, then CPU; fp32 everywhere).")
@click.option("--batch-size", type=POSITIVE_INT, help="Inference batch of the sweep and teacher outputs (default: what the device's free memory holds).")
@click.option("--no-verify", is_flag=True, help="Skip executing the package against the checkpoint.")
@click.option("--no-generate", is_flag=True, help="Skip sampling through the package in verification (checkpoints that ship prompts).")
@click.option("--min-psnr", default=DEFAULT_MIN_PSNR_DB, type=FINITE, help="Verification bar (dB against edgecompile's simulation).")
@click.option("--keep-failed", is_flag=True, help="Keep a package whose verification failed, for inspection (still exits 1).")
@click.option("--force", is_flag=True, help="Replace existing output folders (default: refuse to overwrite).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def export(checkpoint, width_text, bits, output, latent, target, fmt, recipe, target_bits, candidates, sweep_mode, palette_method, group_size,
           calibration, no_distill, distill_steps, distill_budget, swift_resources, pipeline, text_encoder_chunks, img2img, query_chunk, chunks,
           calibration_latent, device,
           batch_size, no_verify, no_generate, min_psnr, keep_failed, force, as_json):
    """Compile CHECKPOINT (default: the bundled one) into one verified package per width.

    Pipeline, in the order it runs: load and validate -> extract width -> rewrite -> calibrate -> layer statistics
    -> sweep (or --recipe) -> palettize -> self-distill -> convert -> verify -> package. A package that verifies below
    --min-psnr is not written (exit 1).
    """
    config = checkpoint_config(checkpoint)
    widths = config.parse_widths(width_text or repr(config.default_width))
    ckpt = load_checkpoint(checkpoint, width=max(widths))  # only what the exported widths read
    latents = parse_latents(latent)
    opts = ExportOptions(
        output=Path(output), widths=widths, force=force,
        latents=LatentPlan(package=latents[0], more=tuple(latents[1:]), calibration=parse_latent(calibration_latent, "--calibration-latent")),
        compression=CompressionOptions(
            bits=Bits(bits), recipe=Path(recipe) if recipe else None,
            sweep=SweepSettings(candidates=parse_int_list(candidates, "--candidates"), mode=SweepMode(sweep_mode), target_bits=target_bits),
            palettes=PaletteMethod(palette_method), group_size=group_size, calibration=Path(calibration) if calibration else None,
            distill=not no_distill, distill_steps=distill_steps, distill_budget_minutes=distill_budget, batch_size=batch_size, device=device),
        package=PackageOptions(fmt=Format(fmt), target=Target(target), chunks=chunks, swift_resources=swift_resources, query_chunk=query_chunk,
                               pipeline=pipeline, img2img=img2img, text_encoder_chunks=text_encoder_chunks),
        verification=VerificationOptions(verify=not no_verify, min_psnr_db=min_psnr, generate=not no_generate, keep_failed=keep_failed),
    )
    with stage_display(console) as display:
        reports = run_export(ckpt, opts, on_stage=display.on_stage, progress=display.update)
    if as_json:
        emit_json({"packages": [{**r.to_dict(), "path": r.path} for r in reports]})
        return
    out.print(render.export_table(ckpt.config.name, reports))
    print_lines(render.export_lines(reports))


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--width", type=WIDTH, help="Width (default: 0.5, or the checkpoint's only width).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Calibration file to write (.safetensors).")
@click.option("--prompts", type=click.Path(), help="Your text embeddings: safetensors with 'tokens' (N, T, D), optional 'null' (default: the checkpoint's).")
@click.option("--schedules", default="4,20", help="Sampling step counts whose trajectories are recorded.")
@click.option("--latent", help="Latent size HxW (default: the config's sample_size).")
@click.option("--seed", default=0, type=SEED, help="Noise seed of the recorded trajectories.")
@click.option("--cfg", "cfg_scale", default=2.0, type=Number(float, min=1), help="Classifier-free guidance scale of the app (1: off).")
@click.option("--device", default=Device.AUTO.value, type=choice(Device), help=DEVICE_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
def calibrate(checkpoint, width, output, prompts, schedules, latent, seed, cfg_scale, device, force):
    """Record calibration inputs along the unquantized model's own sampling trajectories."""
    steps = parse_int_list(schedules, "--schedules", minimum=1)
    width = checkpoint_config(checkpoint).default_width if width is None else width
    ckpt = load_checkpoint(checkpoint, width=width)
    calib = record_calibration(ckpt, width, output, prompts, steps, parse_latent(latent), seed, cfg_scale, force, device)
    console.print(f"wrote {output}: {len(calib)} inputs (width {width:g}, schedules {list(steps)}, seed {seed})")


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--width", type=WIDTH, help="Width (default: 0.5, or the checkpoint's only width).")
@click.option("--candidates", "bits_text", default="4,8", cls=AliasedOption, hidden_aliases=("--bits",), help="Candidate bit-widths.")
@click.option("--sweep-mode", "mode", default=DEFAULT_SWEEP_MODE.value, type=choice(SweepMode), cls=AliasedOption, hidden_aliases=("--mode",),
              help="propagated: predicted denoiser-output error (a forward pass, a backward pass on a third); local: each layer's "
                   "own output error (one forward pass); e2e: denoiser-output error (one pass per layer and bits).")
@click.option("--palettes", "palette_method", default=DEFAULT_PALETTE_METHOD.value, type=choice(PaletteMethod),
              help="How each candidate's LUT and indices are chosen (see export --palettes).")
@click.option("--target-bits", type=FINITE, help=f"Average bits to allocate (default {DEFAULT_TARGET_BITS} unless --target-psnr).")
@click.option("--target-psnr", type=FINITE, help="Allocate the fewest bits whose calibration PSNR reaches this (dB; default: use --target-bits).")
@click.option("--group-size", type=POSITIVE_INT, help="Sweep grouped LUTs of this many output channels (default: one LUT per layer).")
@click.option("--calibration", type=click.Path(), help="Calibration file (default: built from the checkpoint).")
@click.option("--calibration-latent", "latent", cls=AliasedOption, hidden_aliases=("--latent",),
              help="Latent HxW of the calibration built when no --calibration is given (default: sample_size).")
@click.option("--device", default=Device.AUTO.value, type=choice(Device), help=DEVICE_HELP)
@click.option("-o", "--output", required=True, type=click.Path(), help="Recipe JSON to write.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def sweep(checkpoint, width, bits_text, mode, palette_method, target_bits, target_psnr, group_size, calibration, latent, device, output, force, as_json):
    """Per-layer palettization sensitivity and a mixed-bit recipe for one width."""
    if target_bits is not None and target_psnr is not None:
        raise EdgeCompileError("give --target-bits or --target-psnr, not both")
    candidates = parse_int_list(bits_text, "--candidates")
    settings = SweepSettings(candidates=candidates, mode=SweepMode(mode), target_bits=DEFAULT_TARGET_BITS if target_bits is None else target_bits,
                             target_psnr_db=target_psnr)
    width = checkpoint_config(checkpoint).default_width if width is None else width
    ckpt = load_checkpoint(checkpoint, width=width)
    opts = SweepOptions(output=Path(output), width=width, settings=settings, palettes=PaletteMethod(palette_method), group_size=group_size,
                        calibration=Path(calibration) if calibration else None, latent_hw=parse_latent(latent, "--calibration-latent"),
                        device=device, force=force)
    with stage_display(console) as display:
        recipe = run_sweep(ckpt, opts, on_stage=display.on_stage, progress=display.update)
    if as_json:
        emit_json({"recipe": str(output), **{k: v for k, v in recipe.to_dict().items() if k != "layers"}})
        return
    out.print(render.sweep_table(recipe, mode, width, candidates))
    out.print(f"{len(recipe.bits)} layers (15 most sensitive shown); sweep cost {recipe.sweep['cost_forward_passes']:.1f} forward passes "
              f"+ {recipe.sweep['kmeans_seconds']:.1f} s of k-means; wrote {output}")


@cli.command()
@click.argument("package", type=click.Path())
@click.option("--function", help="One function of a multifunction package (default: its default function).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def inspect(package, function, as_json):
    """Op counts, layout ops per block, I/O, metadata and weight bytes of a saved .mlpackage (works on Linux)."""
    view = load_package(package, function=function)
    census = weight_census(view)
    layout = layout_ops_per_block(view)
    if as_json:
        emit_json({"package": str(view.path), "function": view.function, "functions": view.functions, "inputs": view.inputs,
                   "outputs": view.outputs, "metadata": view.metadata, "ops": view.ops, "layout_ops_per_block": layout, **census})
        return
    print_lines(render.inspect_lines(view, census))
    for table in render.inspect_tables(view, layout):
        out.print(table)


@cli.command()
@click.argument("package", type=click.Path())
@click.option("--checkpoint", type=click.Path(), help="The checkpoint it was exported from (default: the bundled one).")
@click.option("--precision", default=Precision.FP32.value, type=choice(Precision),
              help="Interpreter arithmetic: fp32 proves the graph; fp16 predicts device numerics.")
@click.option("--runtime", default=Runtime.AUTO.value, type=choice(Runtime), help=RUNTIME_HELP)
@click.option("--min-psnr", default=DEFAULT_MIN_PSNR_DB, type=FINITE, help="The bar: PSNR (dB) below it fails (exit 1).")
@click.option("--device", default=Device.AUTO.value, type=choice(Device), help="Where the torch references run (auto: CUDA, then MPS, then CPU).")
@click.option("--function", help="Verify one function of a multifunction package (default: every function).")
@click.option("--generate", is_flag=True, help="Also sample through the package with the checkpoint's prompts (final-sample PSNR, digit accuracy).")
@click.option("--steps", default=4, type=Number(int, min=1, max=SampleSettings.MAX_STEPS), help="--generate: sampler steps.")
@click.option("--cfg", "cfg_scale", default=2.0, type=Number(float, min=1), help="--generate: guidance scale.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
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
            print_lines([render.verify_line(package if result.function is None else f"{package} [{result.function}]", result, min_psnr)]
                        + ([render.generation_line(result.generation)] if result.generation is not None else []))
    for result in results:
        check_passed(result)


@cli.command()
@click.argument("package", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The PNG grid to write.")
@click.option("--checkpoint", type=click.Path(), help="The checkpoint it was exported from (default: the bundled one).")
@click.option("--prompt", "labels", multiple=True, help="A prompt of the checkpoint by label (digits: 0..9), or the text to draw when PACKAGE "
                                                       "is an `export --pipeline` Resources folder; repeat it (default: all labels).")
@click.option("--prompts", "prompts_file", type=click.Path(), help="Your text embeddings instead: safetensors with 'tokens' (N, T, D) and 'null'.")
@click.option("--steps", default=4, type=Number(int, min=1, max=SampleSettings.MAX_STEPS), help="Sampler steps (Euler for flow models, DDIM for epsilon).")
@click.option("--cfg", "cfg_scale", default=2.0, type=Number(float, min=1), help="Classifier-free guidance scale (1: off).")
@click.option("--seed", default=0, type=SEED, help="Noise seed.")
@click.option("--per-prompt", default=1, type=Number(int, min=1, max=SampleSettings.MAX_SAMPLES), help="Samples per prompt.")
@click.option("--function", help="One function (latent size) of a multifunction package (default: its default function).")
@click.option("--compare", is_flag=True, help="Add the checkpoint's own samples from the same noise (and their PSNR).")
@click.option("--noise", type=click.Path(), help="Pipeline folders: the initial latents, safetensors 'noise' (N, C, H, W) (default: N(0, 1) from --seed).")
@click.option("--runtime", default=Runtime.AUTO.value, type=choice(Runtime), help=RUNTIME_HELP + " The interpreter runs in fp16.")
@click.option("--device", default=Device.AUTO.value, type=choice(Device), help="Where --compare's checkpoint runs.")
@click.option("--force", is_flag=True, help="Replace an existing PNG (default: refuse to overwrite).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def sample(package, output, checkpoint, labels, prompts_file, steps, cfg_scale, seed, per_prompt, function, compare, noise, runtime, device,
           force, as_json):
    """Run the app's sampling loop with PACKAGE as the denoiser and write the samples as a labelled PNG grid.

    With a Resources folder written by `export --pipeline`, draw pictures from text: tokenizer -> text encoder ->
    denoiser loop -> decoder, all through the packages (-o NAME.png, or NAME.npy for the images as an array)."""
    if is_pipeline_folder(package):
        settings = SampleSettings(steps=steps, cfg_scale=cfg_scale, seed=seed, per_prompt=per_prompt)
        with stage_display(console) as display:
            display.on_stage("text to image")
            summary = run_text_to_image(TextToImageOptions(resources=package, output=output, prompts=tuple(labels), checkpoint=checkpoint,
                                                           settings=settings, noise=noise, compare=compare, runtime=Runtime(runtime),
                                                           force=force))
        if as_json:
            emit_json(summary)
        else:
            psnr = summary["final_image_psnr_db"]
            print_lines([f"{output}: {len(summary['prompts'])} images {summary['images'][1]}x{summary['images'][2]}, {steps} steps, "
                         f"CFG {cfg_scale:g} ({summary['runtime']}, {summary['seconds']:.0f} s)"
                         + (f"; final images {psnr} dB vs {summary['reference']} from the same noise" if psnr is not None else "")])
        return
    if noise:
        raise EdgeCompileError("--noise applies to pipeline folders (export --pipeline): drop it, or pass the Resources folder")
    job = SampleOptions(package=package, output=output, checkpoint=checkpoint, labels=list(labels) or None, prompts_file=prompts_file,
                        settings=SampleSettings(steps=steps, cfg_scale=cfg_scale, seed=seed, per_prompt=per_prompt), compare=compare,
                        runtime=Runtime(runtime), device=device, force=force, function=function).resolve()
    with stage_display(console) as display:
        display.on_stage("sample")
        summary = run_sample(job, progress=display.update)
    if as_json:
        emit_json(summary.to_dict())
        return
    print_lines([f"{output}: " + render.generation_line(summary)])


@cli.command()
@click.argument("packages", nargs=-1, type=click.Path())
@click.option("--config", "configs", multiple=True, type=click.Path(),
              help="Also analyse a config (not exported): a file or a shipped name, e.g. snapgenpp.")
@click.option("--width", "config_widths", default="all", help="Widths of --config: a comma list or 'all'.")
@click.option("--latent", help="Latent HxW for --config (default: its sample_size).")
@click.option("--bits", "config_bits", default=16.0, type=Number(float, min=1, max=32), help="Weight bits assumed for --config.")
@click.option("--profile", "devices", multiple=True, cls=AliasedOption, hidden_aliases=("--device",),
              help=f"Phone cost-model profile(s) in recipes/devices; repeat it (default: {', '.join(DEFAULT_DEVICES)}).")
@click.option("--runs", multiple=True, type=click.Path(), help="Measured runs from other machines (JSON, documented format) to merge.")
@click.option("--reports", "export_reports", multiple=True, type=click.Path(), help="Export report.json files, for the PSNR-vs-size plot.")
@click.option("--no-host", is_flag=True, help="Skip measuring the torch deploy graph on this host.")
@click.option("--host-latent", help="Latent HxW for host timing of --config models (default: --latent; reduce it for paper-scale models on a laptop CPU).")
@click.option("--repeats", default=10, type=Number(int, min=1, max=1000), help="Timed runs after warm-up.")
@click.option("--steps", default=4, type=Number(int, min=1, max=1000), help="Sampler steps of the per-image estimate.")
@click.option("--cfg", "cfg_scale", default=2.0, type=Number(float, min=1), help="Guidance of the per-image estimate (1: one call per step).")
@click.option("-o", "--output", type=click.Path(), help="Report folder (report.md, report.html, PNG plots, bench.json; default: print only).")
@click.option("--force", is_flag=True, help="Replace an existing report folder (default: refuse to overwrite).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def bench(packages, configs, config_widths, latent, config_bits, devices, runs, export_reports, no_host, host_latent, repeats, steps,
          cfg_scale, output, force, as_json):
    """Latency report: static analysis, host timing, Core ML timing (macOS) and device cost-model estimates."""
    opts = BenchOptions(packages=list(packages), configs=list(configs), config_widths=config_widths, latent=parse_latent(latent),
                        config_bits=config_bits, devices=tuple(devices) or DEFAULT_DEVICES, runs=list(runs),
                        export_reports=list(export_reports), host=not no_host, host_latent=parse_latent(host_latent, "--host-latent"),
                        repeats=repeats, steps=steps, cfg_scale=cfg_scale, output=Path(output) if output else None, force=force)
    inputs = resolve_bench(opts)  # every input read and checked before the progress display starts
    with stage_display(console) as display:
        display.on_stage("bench")
        report = run_bench(opts, inputs, progress=display.update)
    if as_json:
        emit_json(report.to_dict())
        return
    out.print(render.bench_table(report))
    print_lines(render.bench_lines(report, output))


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

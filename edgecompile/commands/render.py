"""The tables and lines the CLI prints, built from the commands' typed results (cli.py parses and prints only).

Names an app must spell exactly (package inputs and outputs, functions, chunk files) are never abridged: they
are printed on lines of their own, which the terminal wraps, not in table cells that rich would cut."""

from __future__ import annotations

import math

from rich.table import Table

from edgecompile.bench.report import BenchReport
from edgecompile.compress.recipe import Recipe
from edgecompile.coreml.package import PackageView
from edgecompile.coreml.verify import GenerationSummary, VerifyResult
from edgecompile.export_report import ExportReport
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.config import ModelConfig, width_label
from edgecompile.model.summary import ModelSummary


def db(v: float | None, nan: str = "NaN") -> str:
    return "-" if v is None else nan if not math.isfinite(v) else f"{v:.1f}"


def info_table(c: ModelConfig, summary: ModelSummary) -> Table:
    size = summary.latent
    if c.depth_down == c.depth_up == 0:  # a flat stack (PixArt): one token count
        title = f"{c.name}: latent {size[0]}x{size[1]} ({size[0] * c.vae_scale_factor}x{size[1] * c.vae_scale_factor} px), " \
                f"{summary.tokens['middle']} tokens in every block"
    else:
        t = summary.tokens
        title = f"{c.name}: latent {size[0]}x{size[1]} ({size[0] * c.vae_scale_factor}x{size[1] * c.vae_scale_factor} px), " \
                f"tokens down/middle/up {t['down']}/{t['middle']}/{t['up']}"
    table = Table(title=title)
    for col in ("width", "params", "fp16 weights", "hidden", "heads (q/kv)"):
        table.add_column(col, justify="right")
    for label, row in summary.widths.items():
        table.add_row(label, f"{row.params / 1e6:,.2f} M", f"{row.weight_bytes_fp16 / 2**20:,.1f} MiB", str(row.hidden), f"{row.heads}/{row.kv_heads}")
    return table


def info_lines(c: ModelConfig, ckpt: Checkpoint | None) -> list[str]:
    sampler = "DDPM noise prediction, DDIM sampling" if c.prediction == "epsilon" else "rectified-flow velocity, Euler sampling"
    lines = [f"prediction: {sampler}; text: {c.text_len} tokens x {c.text_dim} channels"]
    if ckpt is not None:
        lines.append(f"checkpoint {ckpt.path} ({ckpt.dtype})")
        acc = ckpt.provenance.get("sample_accuracy")
        if acc:
            lines.append("sample accuracy (20 Euler steps) " + "; ".join(f"width {w}: {accuracy_text(row)}" for w, row in acc.items()))
    return lines


def accuracy_text(row: dict) -> str:
    """A width's sample accuracy from the provenance: one figure, or one per trained latent size."""
    if "accuracy_20_steps" in row:
        return f"{row['accuracy_20_steps']:.0%}"
    return ", ".join(f"{size} {r['accuracy_20_steps']:.0%}" for size, r in row.items())


def export_table(name: str, reports: list[ExportReport]) -> Table:
    """A per-width table that fits 80 columns."""
    table = Table(title=f"edgecompile export: {name}")
    for col in ("width", "params", "size", "avg bits", "held-out PSNR", "vs ckpt"):
        table.add_column(col, justify="right")
    for r in reports:
        psnr = f"{r.verify.psnr_vs_checkpoint_db:.1f} dB" if r.verify and math.isfinite(r.verify.psnr_vs_checkpoint_db) else "-"
        held = r.compression.heldout_psnr_db if r.compression else {}
        held_text = " -> ".join(f"{held[k]:.1f}" for k in ("palettized", "distilled") if k in held) + " dB" if held else "-"
        table.add_row(width_label(r.width), f"{r.params / 1e6:.2f} M", f"{r.size_bytes / 2**20:.2f} MiB", f"{r.average_bits:.2f}", held_text, psnr)
    return table


def export_lines(reports: list[ExportReport]) -> list[str]:
    """Each width's package path and stage times, and how to read the PSNRs."""
    lines = []
    for r in reports:
        lines.append(f"w{width_label(r.width)}: {r.path}")
        lines.append("  " + ", ".join(f"{k} {sec:.1f}s" for k, sec in r.stage_seconds.items()))
        g = r.verify.generation if r.verify else None
        if g is not None:
            lines.append("  " + generation_line(g))
    lines.append(READING_PSNR)
    return lines


READING_PSNR = ("reading the figures: the package is verified against edgecompile's simulation of itself (>= 60 dB: it computes "
                "what was intended); 'held-out' and 'vs ckpt' measure what compression changed, per denoiser call; above ~40 dB "
                "a step's change is invisible, and the final-sample PSNR and digit accuracy of the samples say what the pictures lose")


def sweep_table(recipe: Recipe, mode: str, width: float, candidates: tuple[int, ...], shown: int = 15) -> Table:
    table = Table(title=f"{mode} sweep, width {width_label(width)}: {recipe.average_bits:.3f} bits on average, "
                        f"predicted PSNR {recipe.predicted_psnr_db:.1f} dB")
    for col in ("layer", "size", *(f"sens. {b}-bit" for b in candidates), "bits"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    order = sorted(recipe.bits, key=lambda n: -recipe.sensitivity[n][min(candidates)])
    for n in order[:shown]:
        table.add_row(n, f"{recipe.sizes[n]:,}", *(f"{recipe.sensitivity[n][b]:.3g}" for b in candidates), str(recipe.bits[n]))
    return table


def inspect_lines(view: PackageView, census: dict) -> list[str]:
    """The package's head line, its functions and chunks, and its inputs and outputs, names whole."""
    meta = view.meta
    head = (f"{view.path}  width {width_label(meta.width)}, bits {meta.bits.value}" if meta else
            f"{view.path}  the pipeline's {view.component}" if view.component else f"{view.path}  (no edgecompile metadata)")
    head += (f", latent {'x'.join(map(str, view.latent_hw or ('?',)))}, {census['weight_bytes'] / 2**20:.2f} MiB of weights"
             + (f", {census['average_bits']:.2f} bits/weight palettized" if census["average_bits"] else ""))
    lines = [head]
    if view.functions:
        lines.append(f"multifunction package: {', '.join(f'{n} ({hw})' for n, hw in view.functions.items())}; the first is the default; "
                     f"showing {view.function} (--function to pick another)")
    if view.chunk:
        lines.append(f"chunk {view.chunk[0]} of {view.chunk[1]} of one denoiser: run in the order of "
                     f"{', '.join(meta.chunk_packages)} (denoiser_contract.json says how tensors bind)")
    lines.append("inputs / outputs (names as Swift must spell them):")
    for kind, feats in (("input", view.inputs), ("output", view.outputs)):
        for f in feats:
            lines.append(f"  {kind} {f['name']}  {'x'.join(map(str, f['shape']))} {f['dtype']}")
            if f["description"]:
                lines.append(f"      {f['description']}")
    return lines


def inspect_tables(view: PackageView, layout_ops: dict) -> list[Table]:
    ops_table = Table(title="ops")
    ops_table.add_column("op")
    ops_table.add_column("count", justify="right")
    for k, v in view.ops.items():
        ops_table.add_row(k, str(v))
    lay = Table(title="layout ops per transformer block")
    for col in ("block", "transpose", "reshape"):
        lay.add_column(col, justify="right")
    for blk, counts in layout_ops.items():
        lay.add_row(blk, str(counts["transpose"]), str(counts["reshape"]))
    return [ops_table, lay]


def verify_line(package: str, result: VerifyResult, min_psnr: float) -> str:
    return (f"{package}: width {width_label(result.width)}, {result.runtime}: PSNR {db(result.psnr_db)} dB vs {result.reference}"
            + ("" if result.psnr_db == result.psnr_vs_checkpoint_db else f", {db(result.psnr_vs_checkpoint_db)} dB vs the unquantized checkpoint")
            + (f"; chunks alone: {', '.join(db(v) for v in result.chunk_psnr_db)} dB" if result.chunk_psnr_db else "")
            + (f"; passed (>= {min_psnr:g} dB)" if result.passed else ""))


def generation_line(g: GenerationSummary) -> str:
    line = f"{len(g.labels)} samples, {g.steps} steps, CFG {g.cfg_scale:g} ({g.runtime}, {g.seconds:.0f} s)"
    if g.psnr_db is not None:
        line += f": final samples {db(g.psnr_db)} dB vs the checkpoint's (worst {db(g.worst_sample_psnr_db)} dB)"
    if g.package_accuracy is not None:
        line += f"; digits classified right: package {g.package_accuracy:.0%}"
        if g.checkpoint_accuracy is not None:
            line += f", checkpoint {g.checkpoint_accuracy:.0%}"
    return line


RESOLUTION_MS = 0.1  # below this, the cost model (calibrated on compute-bound phone-scale models) resolves nothing


def ms(v: float) -> str:
    if v < RESOLUTION_MS:
        return f"<{RESOLUTION_MS:g} ms"
    return f"{v / 1e3:.2f} s" if v >= 1000 else f"{v:.1f} ms"


def bench_table(report: BenchReport) -> Table:
    """Per item: size, work, and per device the estimate of one denoiser call and of one image."""
    table = Table(title="edgecompile bench (estimates are cost-model estimates, not measurements)")
    devs = report.devices
    for col in ("item", "params", "weights", "memory", "GMACs", *(f"{d}: step / image" for d in devs), "host"):
        table.add_column(col, justify="left" if col == "item" else "right", overflow="fold")
    for r in report.items:
        host = f"{r.host['median_ms']:.1f} ms{' (noisy)' if r.host_noisy else ''}" if r.host else "-"
        table.add_row(r.item, f"{r.params / 1e6:.1f} M", f"{r.weight_bytes / 2**20:.1f} MiB", f"{r.device_memory_bytes / 2**20:.1f} MiB",
                      f"{r.total_macs / 1e9:.2f}", *(f"{ms(r.estimates_ms[d])} / {ms(r.per_image_ms[d])}" for d in devs), host)
    return table


def bench_lines(report: BenchReport, output) -> list[str]:
    err = report.validation_error_pct
    accuracy = (f"estimates are good to about +-{err:g}% (the cost model's worst validation error on the paper's Fig. 3 ablations; "
                f"worst calibration error {report.calibration_error_pct}%, {report.devices[0]})" if err is not None else
                f"{report.devices[0]} is scaled from another profile, so its estimates have no validation of their own")
    calls = ", ".join(f"{r.kind} x{r.calls_per_image}" for r in report.items if r.kind != "denoiser")
    denoiser = next((r for r in report.items if r.kind == "denoiser"), None)
    lines = [f"per image: {'denoiser x' + str(denoiser.calls_per_image) + ' (steps x 2 with guidance)' if denoiser else ''}"
             f"{', ' + calls if calls else ', the denoiser only'}; {accuracy}" if report.items else "no items"]
    if report.generation_ms is not None:
        lines.append("one image through the whole pipeline (text encoder, denoiser loop, decoder): "
                     + ", ".join(f"{d} {ms(v)}" for d, v in report.generation_ms.items()))
    lines.append("memory: on the device, the weights plus the largest activation of one call (fp16); host: torch on this machine, measured")
    if any(v < RESOLUTION_MS for r in report.items for v in r.estimates_ms.values()):
        lines.append(f"an estimate below {RESOLUTION_MS:g} ms is below the cost model's resolution: it was calibrated on "
                     "compute-bound phone-scale models and cannot resolve per-op dispatch costs")
    noisy = [r.item for r in report.items if r.host_noisy]
    if noisy:
        lines.append(f"warning: host timings of {', '.join(noisy)} are noisy (p10..p90 wider than 25% of the median): another "
                     "process competed; rerun on an idle machine or with more --repeats")
    if output:
        lines.append(f"report in {output}")
    return lines

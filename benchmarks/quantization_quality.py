"""Palettization quality on the bundled checkpoint, per width: edgecompile's palette methods and sweeps against
coremltools' sensitive k-means (`SKMPalettizer`), each with and without self-distillation (issue 16).

For every width: a calibration set (seed 0) drives the layer statistics, the sweeps, SKM's sensitivities and the
self-distillation; a held-out evaluation set (seed 1: other noise, same prompts and schedules) measures the
denoiser-output PSNR against the unquantized model. Full sampling (20 Euler steps, CFG 2.0, the same noise for
every setting) gives the final-sample PSNR against the unquantized model's samples and the classifier accuracy.

Uniform 4-bit: plain k-means, weighted k-means (nearest indices), output-aware (weighted LUT, error-compensating
indices: the default) and SKMPalettizer (coremltools 9.0, per tensor, given the same calibration inputs one at a
time with the same Rademacher-projected output as its loss, so that its Fisher weights are what edgecompile's
statistics estimate; its time includes its sensitivity pass). Mixed 4.3 bits (candidates 4 and 8), output-aware
palettes: the local, e2e (on a spread 60-input subset) and propagated sweeps; and the recipe edgecompile used
before (plain k-means, local sweep). Self-distillation: --distill-steps for every setting (comparable), and the
default pipeline once more with the export's own run (DistillSettings(): DEFAULT_STEPS steps).
`--only default` measures the default palettes and that run alone (minutes, not an hour), merged into the rows.
All measured on edgecompile's torch simulation, which decodes to exactly the package's weights.

Also: the position table (coremltools palettizes it as a large constant; edgecompile stores it as rows plus
columns and keeps it in fp16): its size and what 4-bit palettizing it would cost in PSNR.

    python benchmarks/quantization_quality.py [--widths 0.375,0.5,1.0] [--distill-steps 200] [--only all|default|coreai-opt] [--output DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import _common
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgecompile.compress.allocation import average_bits, greedy
from edgecompile.compress.calibration import default_calibration
from edgecompile.compress.distill import DistillSettings, distill
from edgecompile.compress.importance import measure_statistics
from edgecompile.compress.kmeans import palettize
from edgecompile.compress.palettize_model import PaletteCache, palettizable_layers, palettize_deploy
from edgecompile.compress.sensitivity import calibration_outputs, output_psnr, sweep
from edgecompile.coremltools_loader import import_coremltools, quiet_coremltools
from edgecompile.deploy.contract import with_btd_text
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.metrics import psnr_db
from edgecompile.model.checkpoint import load_checkpoint
from edgecompile.model.digits import sample_accuracy, train_classifier

COREAI_OPT_VERSION = "0.3.0"  # the version checked (pyproject's bench extra pins it)
TARGET_BITS = 4.3
CANDIDATES = [4, 8]
DEFAULT_DISTILL = "self-distillation (the default export's run)"
SUPERSEDED = "self-distillation to convergence (the default export)"  # the plateau schedule before issue 29's
E2E_INPUTS = 60  # the e2e sweep runs the whole model per layer and bit-width: a spread subset of the calibration set
SAMPLE_STEPS = 20
PER_CLASS = 10


def skm_weights(teacher, calib, nbits: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """coremltools' SKMPalettizer on a copy of the deploy graph; the palettized weights of edgecompile's layers
    (fp16, as a package stores its LUT) and its wall time."""
    import_coremltools()
    with quiet_coremltools():
        from coremltools.optimize.torch.palettization import ModuleSKMPalettizerConfig, SKMPalettizer, SKMPalettizerConfig
    model = copy.deepcopy(teacher)
    for p in model.parameters():
        p.requires_grad_(True)  # SKM squares the gradients of every trainable parameter
    g = torch.Generator().manual_seed(seed + 104729)
    data = list(calib.batches(1))

    def loss_fn(m, d):  # the Rademacher projection of the output: E[grad^2] is the output's diagonal Fisher
        y = m(*d)
        return (y * (torch.randint(0, 2, y.shape, generator=g).float() * 2 - 1)).sum()

    config = SKMPalettizerConfig(global_config=ModuleSKMPalettizerConfig(n_bits=nbits, granularity="per_tensor"))
    start = time.perf_counter()
    with quiet_coremltools():
        out = SKMPalettizer(model, config).compress(dataloader=data, loss_fn=loss_fn)
    seconds = time.perf_counter() - start
    layers = palettizable_layers(out)
    return {n: layers[n].weight.detach().to(torch.float16).float() for n in palettizable_layers(teacher)}, seconds


def coreai_opt_weights(teacher, calib, bits: dict[str, int], sensitive: bool, seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """coreai-opt's `KMeansPalettizer` (Apple's Core AI optimisation library) on a copy of the deploy graph: per tensor,
    edgecompile's layers only, each at its bits in `bits` (one run with a config per layer name, as a user of
    coreai-opt would allocate mixed bits). `sensitive`: its Sensitive K-Means (`calibration_mode`), given the
    calibration inputs one at a time with the same Rademacher-projected output as SKMPalettizer's loss. Returns the
    palettized weights of those layers (fp16, as a package stores its LUT) and its wall time."""
    import re

    from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig, ModuleKMeansPalettizerConfig, PalettizationSpec
    from coreai_opt.palettization.config.palettization_config import OpKMeansPalettizerConfig
    from coreai_opt.palettization.spec import PerTensorGranularity

    def layer_config(nbits: int) -> ModuleKMeansPalettizerConfig:
        spec = PalettizationSpec(n_bits=nbits, granularity=PerTensorGranularity())
        return ModuleKMeansPalettizerConfig(op_input_spec=None, op_output_spec=None,
                                            op_state_spec=dict.fromkeys(OpKMeansPalettizerConfig.get_default_state_spec(), spec))

    config = KMeansPalettizerConfig(global_config=None,  # the layers edgecompile leaves in fp16 stay so here too
                                    module_name_configs={f"^{re.escape(n)}$": layer_config(b) for n, b in bits.items()})
    model = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed + 104729)

    def loss_fn(y, _target):  # the Rademacher projection of the output: E[grad^2] is the output's diagonal Fisher
        return (y * (torch.randint(0, 2, y.shape, generator=g).float() * 2 - 1)).sum()

    data = list(calib.batches(1))
    start = time.perf_counter()
    palettizer = KMeansPalettizer(model, config)
    model = palettizer.prepare(tuple(data[0]))
    if sensitive:
        for p in model.parameters():
            p.requires_grad_(True)
        with palettizer.calibration_mode(loss_fn=loss_fn) as skm:
            for d in data:
                skm.step(model(*d), None)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        layers = palettizable_layers(model)  # a parametrized module's .weight is its palettized weight
        return {n: layers[n].weight.detach().to(torch.float16).float() for n in bits}, seconds


def position_table(ckpt, width, teacher, evalset, ref_eval) -> dict:
    """The position table's size against the 4-bit weights, and the PSNR of the unquantized model with the table
    palettized to 4 bits (plain k-means per tensor, as coremltools would)."""
    buffers = {n: b for n, b in teacher.named_buffers() if n.startswith("pos_")}
    elements = sum(b.numel() for b in buffers.values())
    weights = sum(m.weight.numel() for m in palettizable_layers(teacher).values())
    model = deploy_model(ckpt.model, width)
    for name, b in buffers.items():
        p = palettize(b.reshape(b.shape[1], -1).numpy(), 4)  # rows: channels
        setattr(model, name, torch.from_numpy(p.decode().astype(np.float32)).reshape(b.shape))  # a new buffer, not written into
    return {"buffers": {n: list(b.shape) for n, b in buffers.items()}, "elements": elements, "fp16_bytes": 2 * elements,
            "share_of_4bit_weight_bytes": round(2 * elements / (weights / 2), 4),
            "psnr_if_4bit_db": round(output_psnr(ref_eval, calibration_outputs(model, evalset)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--widths", default="0.375,0.5,1.0")
    ap.add_argument("--distill-steps", type=int, default=200, help="every setting's step count (comparable rows)")
    ap.add_argument("--only", choices=["all", "default", "coreai-opt"], default="all",
                    help="coreai-opt: only its KMeans and SKM rows and edgecompile's default palettes beside them, no distillation; "
                         "merged into the width's existing rows")
    ap.add_argument("--output")
    args = ap.parse_args()
    torch.manual_seed(0)
    ckpt = load_checkpoint()
    clf = train_classifier()
    console = Console()
    results = {}
    for width in [float(w) for w in args.widths.split(",")]:
        t0 = time.perf_counter()
        calib = default_calibration(ckpt, width, seed=0)
        evalset = default_calibration(ckpt, width, seed=1)
        teacher = deploy_model(ckpt.model, width)
        layers = palettizable_layers(teacher)
        sizes = {n: m.weight.numel() for n, m in layers.items()}
        ref_eval = calibration_outputs(teacher, evalset)
        ref_acc, ref_samples = sample_accuracy(with_btd_text(teacher), ckpt.prompts, clf, PER_CLASS, SAMPLE_STEPS)
        stats = measure_statistics(teacher, layers, calib)
        caches = {m: PaletteCache(teacher, None, m, stats if m != "plain" else None) for m in ("plain", "weighted", "output-aware")}
        rows = {}

        def measure(name, model, bits, extra=None):
            acc, samples = sample_accuracy(with_btd_text(model), ckpt.prompts, clf, PER_CLASS, SAMPLE_STEPS)
            rows[name] = {
                "average_bits": round(average_bits(bits, sizes), 4),
                "heldout_psnr_db": round(output_psnr(ref_eval, calibration_outputs(model, evalset)), 2),
                "sample_psnr_db": round(psnr_db(ref_samples.numpy(), samples.numpy()), 2),
                "sample_accuracy": acc, **(extra or {}),
            }
            console.print(f"w{width:g} {name}: {rows[name]}")

        def palettized(bits, cache=None, weights=None):
            model = deploy_model(ckpt.model, width)
            if weights is not None:
                for n, w in weights.items():
                    palettizable_layers(model)[n].weight = torch.nn.Parameter(w, requires_grad=False)
            else:
                palettize_deploy(model, bits, None, cache)
            return model

        def with_distillation(name, bits, cache=None, weights=None, steps=args.distill_steps, label="self-distillation"):
            student = palettized(bits, cache, weights)
            res = distill(student, teacher, calib, DistillSettings(steps=steps))  # steps None: the export's default run
            measure(f"{name} + {label}", student, bits, {"distill": {k: v for k, v in res.to_dict().items() if k not in ("history",)}})

        uniform4 = dict.fromkeys(sizes, 4)
        palettize(np.linspace(-1, 1, 4096).reshape(64, 64), 4)  # warm-up: the first k-means call loads coremltools' DP
        timings = {}
        default = "mixed 4.3, output-aware, propagated sweep"  # what `export --bits mixed` does
        if args.only != "all":  # the peer, or the default export's distillation, beside edgecompile's default palettes
            caches = {"output-aware": caches["output-aware"]}
        for method, cache in caches.items():
            start = time.perf_counter()
            for n in layers:
                cache.palette(n, 4)
            timings[method] = round(time.perf_counter() - start + (stats.seconds if method != "plain" else 0.0), 2)
            measure(f"uniform 4-bit, {method}", palettized(uniform4, cache), uniform4, {"seconds": timings[method]})
        sweeps = {"propagated": sweep(teacher, calib, CANDIDATES, "propagated", caches["output-aware"])}
        mixed = {default: (greedy(sweeps["propagated"].sensitivity, sizes, CANDIDATES, TARGET_BITS)[0], caches["output-aware"])}
        start = time.perf_counter()
        for n in layers:
            caches["output-aware"].palette(n, mixed[default][0][n])
        measure(default, palettized(*mixed[default]), mixed[default][0],
                {"seconds": round(timings["output-aware"] + sweeps["propagated"].seconds + time.perf_counter() - start, 2)})

        if args.only == "default":
            with_distillation(default, *mixed[default], steps=None, label=DEFAULT_DISTILL)
            # only the distilled row: the rows it was built from are deterministic, and their times belong to their own run
            results[f"{width:g}"] = {"unquantized_sample_accuracy": ref_acc, "palette_seconds": {}, "default_distill_run": time.strftime("%Y-%m-%d"),
                                     "settings": {k: v for k, v in rows.items() if k.endswith(DEFAULT_DISTILL)}}
            write(results, args.output)
            continue

        peers = {}  # Apple's coreai-opt at the same bits per layer: uniform 4 and the default's mixed allocation
        for label, bits in (("uniform 4-bit", uniform4), ("mixed 4.3", mixed[default][0])):
            for method, sensitive in (("KMeans", False), ("SKM", True)):
                weights, seconds = coreai_opt_weights(teacher, calib, bits, sensitive)
                name = f"{label}, coreai-opt {method}"
                peers[name] = (bits, weights)
                timings[f"coreai-opt {method}, {label}"] = round(seconds, 2)
                measure(name, palettized(bits, weights=weights), bits, {"seconds": round(seconds, 2)})
        if args.only == "coreai-opt":
            results[f"{width:g}"] = {"unquantized_sample_accuracy": ref_acc, "settings": rows, "palette_seconds": timings, "coreai_opt": COREAI_OPT_VERSION,
                                     "coreai_opt_run": time.strftime("%Y-%m-%d")}
            write(results, args.output)
            continue

        skm, skm_seconds = skm_weights(teacher, calib, 4)
        timings["SKMPalettizer"] = round(skm_seconds, 2)
        measure("uniform 4-bit, coremltools SKMPalettizer", palettized(uniform4, weights=skm), uniform4, {"seconds": timings["SKMPalettizer"]})

        sweeps["local"] = sweep(teacher, calib, CANDIDATES, "local", caches["output-aware"])
        sweeps["e2e"] = sweep(teacher, calib.subset(E2E_INPUTS), CANDIDATES, "e2e", caches["output-aware"])
        before = sweep(teacher, calib, CANDIDATES, "local", caches["plain"])
        others = {f"mixed 4.3, output-aware, {mode} sweep": (greedy(sweeps[mode].sensitivity, sizes, CANDIDATES, TARGET_BITS)[0], caches["output-aware"])
                  for mode in ("local", "e2e")}
        others["mixed 4.3, plain k-means, local sweep (before)"] = (greedy(before.sensitivity, sizes, CANDIDATES, TARGET_BITS)[0], caches["plain"])
        for name, (bits, cache) in others.items():
            measure(name, palettized(bits, cache), bits)
        mixed.update(others)

        with_distillation("uniform 4-bit, plain", uniform4, caches["plain"])
        with_distillation("uniform 4-bit, output-aware", uniform4, caches["output-aware"])
        with_distillation("uniform 4-bit, coremltools SKMPalettizer", uniform4, weights=skm)
        for name, (bits, weights) in peers.items():
            with_distillation(name, bits, weights=weights)
        for name, (bits, cache) in mixed.items():
            with_distillation(name, bits, cache)
        with_distillation(default, *mixed[default], steps=None, label=DEFAULT_DISTILL)

        results[f"{width:g}"] = {
            "unquantized_sample_accuracy": ref_acc, "settings": rows, "palette_seconds": timings,
            "statistics": {"seconds": round(stats.seconds, 2), "cost_forward_passes": round(stats.cost_forward_passes, 2)},
            "sweep_seconds": {m: round(r.seconds, 2) for m, r in sweeps.items()},
            "sweep_cost_forward_passes": {m: round(r.cost_forward_passes, 2) for m, r in sweeps.items()},
            "position_table": position_table(ckpt, width, teacher, evalset, ref_eval),
            "calibration_inputs": len(calib), "e2e_sweep_inputs": min(E2E_INPUTS, len(calib)), "evaluation_inputs": len(evalset),
            "distill_steps": args.distill_steps, "seconds": round(time.perf_counter() - t0, 1),
            "coreai_opt": COREAI_OPT_VERSION,
        }
        write(results, args.output)  # after every width: a long run keeps what it measured
    for width, r in results.items():
        table = Table(title=f"width {width}: PSNR against the unquantized model; unquantized accuracy {r['unquantized_sample_accuracy']:.0%}")
        for col in ("setting", "avg bits", "held-out PSNR dB", "sample PSNR dB", "accuracy"):
            table.add_column(col, justify="left" if col == "setting" else "right")
        for name, row in r["settings"].items():
            table.add_row(name, f"{row['average_bits']:.2f}", f"{row['heldout_psnr_db']:.1f}", f"{row['sample_psnr_db']:.1f}", f"{row['sample_accuracy']:.0%}")
        console.print(table)
        if "position_table" in r:
            console.print(f"palette seconds {r['palette_seconds']}; sweep cost in forward passes {r['sweep_cost_forward_passes']}; "
                          f"position table {r['position_table']}")
        else:
            console.print(f"palette seconds {r['palette_seconds']}")
    print(f"wrote {write(results, args.output)}")


def write(results: dict, output: str | None) -> Path:
    """Merge into an existing result file, so widths can be measured in separate runs."""
    out_dir = Path(output) if output else _common.RESULTS
    path = out_dir / "quantization_quality.json"
    widths = dict(results)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("version") == 2:  # a width measured again keeps the rows this run did not measure
            widths = old.get("widths", {})
            for width, new in results.items():
                kept = widths.get(width, {})
                if any(k.endswith(DEFAULT_DISTILL) for k in new["settings"]):  # the default's run replaces the one it superseded
                    kept = {**kept, "settings": {k: v for k, v in kept.get("settings", {}).items() if not k.endswith(SUPERSEDED)}}
                widths[width] = {**kept, **new, "settings": {**kept.get("settings", {}), **new["settings"]},
                                 "palette_seconds": {**kept.get("palette_seconds", {}), **new["palette_seconds"]}}
    result = {"version": 2, "checkpoint": "bundled default", "target_bits": TARGET_BITS, "sample_steps": SAMPLE_STEPS, "per_class": PER_CLASS,
              "widths": dict(sorted(widths.items(), key=lambda kv: float(kv[0])))}
    return _common.write_result("quantization_quality", result, out_dir)


if __name__ == "__main__":
    main()

"""Quality of each palettization setting on the trained default checkpoint, per width (issues 4 and 5).

For every width: a calibration set (seed 0) drives the sweeps, the allocation and the self-distillation; a
held-out evaluation set (seed 1: other noise, same prompts and schedules) measures the denoiser-output PSNR
against the unquantized model. Full sampling (20 Euler steps, CFG 2.0, the same noise for every setting) gives
the final-sample PSNR against the unquantized model's samples and the classifier accuracy.

Settings: uniform 8-bit and 4-bit; mixed 4.3 bits from the local sweep and from the e2e sweep; Apple's threshold
recipe at the same average; and, for 4-bit and local-mixed 4.3, analytic bias correction and self-distillation.
All measured on edgecompile's torch simulation, which decodes to exactly the package's weights (tests check this).

    python benchmarks/quantization_quality.py [--widths 0.375,0.5,1.0] [--output DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import torch
from rich.console import Console
from rich.table import Table

from edgecompile.compress.allocation import average_bits, greedy, threshold_allocation
from edgecompile.compress.calibration import default_calibration
from edgecompile.compress.distill import DistillSettings, bias_correction, distill
from edgecompile.compress.palettize_model import PaletteCache, palettize_deploy
from edgecompile.compress.sensitivity import calibration_outputs, output_psnr, sweep
from edgecompile.deploy.contract import with_btd_text
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.metrics import psnr_db
from edgecompile.model.checkpoint import load_checkpoint
from edgecompile.model.digits import sample_accuracy, train_classifier

TARGET_BITS = 4.3
E2E_INPUTS = 60  # the e2e sweep runs the whole model per layer and bit-width: a spread subset of the calibration set
SAMPLE_STEPS = 20
PER_CLASS = 10


def as_denoiser(deploy):
    return with_btd_text(deploy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--widths", default="0.375,0.5,1.0")
    ap.add_argument("--distill-steps", type=int, default=200, help="fixed, so that runs are comparable (the committed results used 200)")
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
        cache = PaletteCache(teacher)
        ref_eval = calibration_outputs(teacher, evalset)
        ref_acc, ref_samples = sample_accuracy(as_denoiser(teacher), ckpt.prompts, clf, PER_CLASS, SAMPLE_STEPS)
        local = sweep(teacher, calib, [4, 8], "local", cache)
        e2e = sweep(teacher, calib.subset(E2E_INPUTS), [4, 8], "e2e", cache)
        sizes = local.sizes
        apple_bits, threshold = threshold_allocation(e2e.psnr_db, sizes, [4, 8], TARGET_BITS)
        settings = {
            "uniform 8-bit": dict.fromkeys(sizes, 8),
            "uniform 4-bit": dict.fromkeys(sizes, 4),
            "mixed 4.3 local sweep": greedy(local.sensitivity, sizes, [4, 8], TARGET_BITS)[0],
            "mixed 4.3 e2e sweep": greedy(e2e.sensitivity, sizes, [4, 8], TARGET_BITS)[0],
            f"Apple threshold recipe ({threshold:.1f} dB)": apple_bits,
        }
        rows = {}

        def measure(name, model, bits, extra=None):
            acc, samples = sample_accuracy(as_denoiser(model), ckpt.prompts, clf, PER_CLASS, SAMPLE_STEPS)
            rows[name] = {
                "average_bits": round(average_bits(bits, sizes), 4),
                "denoiser_psnr_db": round(output_psnr(ref_eval, calibration_outputs(model, evalset)), 2),
                "sample_psnr_db": round(psnr_db(ref_samples.numpy(), samples.numpy()), 2),
                "sample_accuracy": acc, **(extra or {}),
            }
            console.print(f"w{width:g} {name}: {rows[name]}")

        for name, bits in settings.items():
            model = deploy_model(ckpt.model, width)
            palettize_deploy(model, bits, None, cache)
            measure(name, model, bits)
        for base in ("uniform 4-bit", "mixed 4.3 local sweep"):
            bits = settings[base]
            corrected = deploy_model(ckpt.model, width)
            palettize_deploy(corrected, bits, None, cache)
            bias_correction(corrected, teacher, calib)
            measure(f"{base} + bias correction", corrected, bits)
            student = deploy_model(ckpt.model, width)
            palettize_deploy(student, bits, None, cache)
            res = distill(student, teacher, calib, DistillSettings(steps=args.distill_steps))
            measure(f"{base} + self-distillation", student, bits,
                    {"distill": {k: v for k, v in res.to_dict().items() if k != "history"}})
        results[f"{width:g}"] = {
            "unquantized_sample_accuracy": ref_acc, "settings": rows,
            "sweep_seconds": {"local": round(local.seconds, 2), "e2e": round(e2e.seconds, 2)},
            "sweep_cost_forward_passes": {"local": round(local.cost_forward_passes, 2), "e2e": round(e2e.cost_forward_passes, 2)},
            "calibration_inputs": len(calib), "e2e_sweep_inputs": min(E2E_INPUTS, len(calib)), "evaluation_inputs": len(evalset),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write(results, args.output)  # after every width: a long run keeps what it measured
    for width, r in results.items():
        table = Table(title=f"width {width}: PSNR against the unquantized model (held-out inputs); unquantized accuracy {r['unquantized_sample_accuracy']:.0%}")
        for col in ("setting", "avg bits", "denoiser PSNR dB", "sample PSNR dB", "accuracy"):
            table.add_column(col, justify="left" if col == "setting" else "right")
        for name, row in r["settings"].items():
            table.add_row(name, f"{row['average_bits']:.2f}", f"{row['denoiser_psnr_db']:.1f}", f"{row['sample_psnr_db']:.1f}", f"{row['sample_accuracy']:.0%}")
        console.print(table)
        console.print(f"sweep cost: local {r['sweep_cost_forward_passes']['local']} forward passes ({r['sweep_seconds']['local']} s incl. k-means), "
                      f"e2e {r['sweep_cost_forward_passes']['e2e']} ({r['sweep_seconds']['e2e']} s)")
    print(f"wrote {write(results, args.output)}")


def write(results: dict, output: str | None) -> Path:
    """Merge into an existing result file, so widths can be measured in separate runs."""
    out_dir = Path(output) if output else _common.RESULTS
    path = out_dir / "quantization_quality.json"
    widths = dict(results)
    if path.exists():
        import json

        widths = {**json.loads(path.read_text()).get("widths", {}), **results}
    result = {"checkpoint": "bundled default", "target_bits": TARGET_BITS, "sample_steps": SAMPLE_STEPS, "per_class": PER_CLASS,
              "widths": dict(sorted(widths.items(), key=lambda kv: float(kv[0])))}
    return _common.write_result("quantization_quality", result, out_dir)


if __name__ == "__main__":
    main()

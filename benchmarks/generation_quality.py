"""Pictures through the package: the app's sampling loop run through exported packages of the bundled checkpoint,
per width and bit setting, against the checkpoint's own samples from the same noise.

    python benchmarks/generation_quality.py [--widths 0.375,0.5,1.0] [--bits 16,4,mixed] [--per-prompt 3] [--workdir DIR]

For each width and bit setting: `edgecompile export` (a child process; palettized exports self-distil for
--distill-budget minutes), then `generate` (edgecompile.coreml.generate) with --per-prompt samples of each digit,
4 Euler steps, CFG 2, noise seed 0, through the package (the MIL interpreter in fp16 on Linux, Core ML on macOS).
Reported: final-sample PSNR against the checkpoint's samples, and the share of the package's samples that an
SVM trained on the real digits classifies as the digit asked for. One picture per width (checkpoint, fp16
package, mixed package; one sample of each digit): benchmarks/results/generation_w<W>.png.
Results: benchmarks/results/generation_quality.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common

from edgecompile.coreml.generate import SampleSettings, generate, save_grid
from edgecompile.coreml.package import load_package, weight_census
from edgecompile.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

EDGECOMPILE = [sys.executable, "-m", "edgecompile"]
BITS_LABEL = {"16": "fp16", "4": "4-bit", "mixed": "mixed"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="0.375,0.5,1.0")
    ap.add_argument("--bits", default="16,4,mixed")
    ap.add_argument("--per-prompt", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--distill-budget", default="1", help="minutes of self-distillation per palettized export")
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgecompile-generation-"))
    output = Path(args.output) if args.output else _common.RESULTS
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    settings = SampleSettings(steps=args.steps, cfg_scale=2.0, seed=0, per_prompt=args.per_prompt)
    rows = []
    for width in args.widths.split(","):
        pictures = {}
        for bits in args.bits.split(","):
            out = work / f"w{width}_{bits}"
            extra = [] if bits == "16" else ["--distill-budget", args.distill_budget]
            step = _common.run_child(EDGECOMPILE + ["export", "--width", width, "--bits", bits, "-o", str(out), "--force", "--no-generate", *extra])
            step.pop("stdout")
            row = {"width": float(width), "bits": bits, "export": step}
            if step["rc"] == 0:
                view = load_package(next(out.glob("w*/*.mlpackage")))
                result = generate(view, ckpt, ckpt.prompts, settings=settings)
                summary = result.summary()
                row.update(average_bits=round(weight_census(view)["average_bits"] or 16.0, 3),
                           sample_psnr_db=summary.psnr_db, worst_sample_psnr_db=summary.worst_sample_psnr_db,
                           package_accuracy=summary.package_accuracy, checkpoint_accuracy=summary.checkpoint_accuracy,
                           samples=len(summary.labels), runtime=summary.runtime, seconds=summary.seconds)
                first = slice(0, None, args.per_prompt)  # one sample of each digit for the picture
                pictures.setdefault("checkpoint", result.checkpoint_samples[first])
                pictures[f"{BITS_LABEL[bits]} package"] = result.package_samples[first]
                labels = result.labels[first]
                print(f"width {width} {BITS_LABEL[bits]}: final samples {summary.psnr_db:.1f} dB vs the checkpoint, "
                      f"digits right {summary.package_accuracy:.0%} (checkpoint {summary.checkpoint_accuracy:.0%})", flush=True)
            rows.append(row)
            _common.write_result("generation_quality", {"settings": settings.__dict__, "rows": rows}, output)
        if pictures:
            save_grid(list(pictures.items()), labels, output / f"generation_w{width}.png",
                      f"bundled checkpoint, width {width}: {args.steps} Euler steps, CFG 2, seed 0 (same noise in every row)")
    print(f"wrote {output / 'generation_quality.json'}")


if __name__ == "__main__":
    main()

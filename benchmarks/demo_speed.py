"""`make demo`'s export against a plain coremltools conversion of the same width, side by side in one run (issue 29,
target 3: the export no slower than 4x the plain conversion, held-out PSNR no lower than 50.6 dB).

    python benchmarks/demo_speed.py [--width 0.5] [--repeats 1] [--workdir DIR] [--output DIR]

Each measurement is a child process timed from outside (interpreter start and imports included on both sides):
1. plain: coremltools' own conversion of the bundled checkpoint's reference model at --width (torch.jit.trace,
   fp16 compute, the default pass pipeline, saved as an .mlpackage): no compression, no verification.
2. demo: `edgecompile export --width W --bits mixed --pipeline`, the command `make demo` runs (sweep, 4.3-bit
   palettes, self-distillation, convert, verification with sampling through the package, the pipeline parts).
The two alternate (plain, demo, plain, demo, ...) so that a machine that gets busier slows both; the ratio is the
median demo over the median plain. report.json's per-stage seconds and held-out PSNR come along.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common

TARGET_RATIO = 4.0
TARGET_HELDOUT_DB = 50.6  # the figure for today's demo export


def plain_child(width: float, out: str) -> None:
    """coremltools' conversion of the reference model of one width as it is."""
    import torch

    from edgecompile.coremltools_loader import import_coremltools
    from edgecompile.model.checkpoint import load_checkpoint
    from edgecompile.model.elastic import extract_width

    import_coremltools()  # imported before the clock starts, as the export has it
    start = time.perf_counter()
    ckpt = load_checkpoint()
    model = extract_width(ckpt.model, width, share=True).eval()
    c = ckpt.config
    example = (torch.randn(1, c.latent_channels, *c.sample_size), torch.tensor([500.0]), torch.randn(1, c.text_len, c.text_dim))
    with torch.no_grad():
        model(*example)  # warm the constant caches (BNA mask, positions) so that the trace sees constants
    _common.plain_conversion(model, example).save(out)
    print(json.dumps({"seconds_inside": round(time.perf_counter() - start, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", default="0.5")
    ap.add_argument("--repeats", type=int, default=1, help="alternating pairs (plain, demo)")
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    ap.add_argument("--plain-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        return plain_child(float(args.plain_child[0]), args.plain_child[1])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="demo_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    plain, demo = [], []
    for i in range(args.repeats):
        step = _common.run_child(me + ["--plain-child", args.width, str(work / f"plain{i}.mlpackage")])
        if step["rc"] != 0:
            raise SystemExit("the plain conversion failed")
        plain.append(step["wall_s"])
        print(f"plain coremltools conversion, width {args.width}: {step['wall_s']:.1f} s", flush=True)
        out = work / f"demo{i}"
        step = _common.run_child([sys.executable, "-m", "edgecompile", "export", "--width", args.width, "--bits", "mixed", "--pipeline",
                                  "-o", str(out), "--force"])
        summary = _common.export_summary(step, out)
        if step["rc"] != 0:
            raise SystemExit("the demo export failed")
        report = json.loads(next(out.glob("w*/report.json")).read_text())
        summary["heldout_psnr_db"] = report["heldout_psnr_db"]
        demo.append(summary)
        print(f"demo export: {step['wall_s']:.1f} s; held-out {summary['heldout_psnr_db']}; stages {summary['stage_seconds']}", flush=True)
    ratio = statistics.median(d["wall_s"] for d in demo) / statistics.median(plain)
    heldout = statistics.median(d["heldout_psnr_db"].get("distilled", d["heldout_psnr_db"]["palettized"]) for d in demo)
    result = {"width": float(args.width), "plain_seconds": plain, "demo": demo, "ratio": round(ratio, 2), "target_ratio": TARGET_RATIO,
              "heldout_psnr_db": heldout, "target_heldout_psnr_db": TARGET_HELDOUT_DB,
              "holds": ratio <= TARGET_RATIO and heldout >= TARGET_HELDOUT_DB}
    print(f"demo export / plain conversion: {ratio:.2f}x (target <= {TARGET_RATIO:g}x); held-out {heldout:.2f} dB "
          f"(target >= {TARGET_HELDOUT_DB} dB): {'holds' if result['holds'] else 'does not hold'}")
    print("wrote", _common.write_result("demo_speed", result, Path(args.output) if args.output else None))


if __name__ == "__main__":
    main()

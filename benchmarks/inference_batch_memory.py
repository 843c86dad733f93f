"""One inference pass over calibration inputs at paper scale, by batch (issue 29, target 2): the memory a batch adds
beside the weights and the pass's time, which `model/budget.batch_size_for` sizes the export's inference batch by
(the held-out reference and simulation passes, the sweep's predicted PSNR, distillation's evaluations). Each batch
runs in a child process of its own: the random paper-scale model narrowed to the width, random inputs at 32x32, the
kernel's high-water mark reset (/proc/self/clear_refs), then `calibration_outputs` over every input.

    python benchmarks/inference_batch_memory.py [--width 1.0] [--batches 46,16] [--inputs 46] [--output DIR]

46 inputs: the width 1.0 export's calibration set less its held-out fifth and the backward third (its held-out and
calibration passes ran one batch of 46 and 58 before the CPU cap).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import _common
from statistics_memory import high_water_gib, random_graph, resident_gib


def child(config_path: str, width: float, batch: int, n_inputs: int) -> dict:
    from edgecompile.compress.sensitivity import calibration_outputs

    deploy, calib = random_graph(config_path, width, n_inputs)
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here on
    before = resident_gib()
    start = time.perf_counter()
    calibration_outputs(deploy, calib, batch)
    seconds = time.perf_counter() - start
    return {"width": width, "inputs": n_inputs, "batch": batch, "resident_before_gib": round(before, 2),
            "peak_gib": round(high_water_gib(), 2), "added_gib": round(high_water_gib() - before, 2), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "snapgenpp.yaml"))
    ap.add_argument("--width", default="1.0")
    ap.add_argument("--batches", default="46,16")
    ap.add_argument("--inputs", type=int, default=46)
    ap.add_argument("--output")
    ap.add_argument("--child", nargs=3, metavar=("WIDTH", "BATCH", "INPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        w, b, n = args.child
        print(json.dumps(child(args.config, float(w), int(b), int(n))))
        return
    rows = []
    for batch in args.batches.split(","):
        step = _common.run_child([sys.executable, __file__, "--config", args.config, "--child", args.width, batch, str(args.inputs)])
        row = {"batch": int(batch), "rc": step["rc"], "wall_s": step["wall_s"]}
        if step["rc"] == 0:
            row.update(json.loads(step["stdout"].strip().splitlines()[-1]))
            print(f"width {args.width}, batch {batch}: +{row['added_gib']} GiB beside {row['resident_before_gib']} GiB, {row['seconds']} s", flush=True)
        rows.append(row)
    print("wrote", _common.write_result("inference_batch_memory", {"config": args.config, "latent": "32x32", "runs": rows},
                                        Path(args.output) if args.output else None))


if __name__ == "__main__":
    main()

"""The layer statistics' memory and time at paper scale (issue 29, target 2): what `export --bits mixed` holds while
it measures H and F, by width and by the backward pass's batch. Each configuration runs in a child process of its
own: the random paper-scale model narrowed to the width (what `load_checkpoint(path, width=W)` holds), random
calibration inputs at 32x32, then the kernel's high-water mark of the process is reset (/proc/self/clear_refs) and
`measure_statistics` runs; its peak is that mark, read after each batch. The model's construction is left out of
the peak because an export loads a checkpoint instead.

    python benchmarks/statistics_memory.py [--runs 0.375:64:2,0.375:64:4,...] [--inputs 58] [--output DIR]

A run is WIDTH:FORWARD_BATCH:GRADIENT_BATCH. The default runs width 0.375 at the export's batch of 64 with backward
batches of 2, 4, 8 and 19 (19: all of that width's backward inputs at once, the export's behaviour before issue 29's
gradient batch), and width 1.0 with batches of 8 and 1 (killed at 24.4 GiB with 64 and 4 on this 24 GiB machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import _common

DEFAULT_RUNS = "0.375:64:19,0.375:64:8,0.375:64:4,0.375:64:2,1.0:8:1"


def high_water_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def resident_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def random_graph(config_path: str, width: float, n_inputs: int):
    """(the deploy graph at 32x32 of a random model of the config narrowed to `width`, random inputs at 32x32)."""
    import torch

    from edgecompile.compress.calibration import CalibrationSet
    from edgecompile.deploy.rewrite import deploy_model
    from edgecompile.model.config import ModelConfig
    from edgecompile.model.dit import EfficientDiT
    from edgecompile.model.elastic import narrow_to_width

    config = ModelConfig.load(config_path)
    torch.manual_seed(0)
    model = narrow_to_width(EfficientDiT(config).eval(), width)
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet(torch.randn(n_inputs, config.latent_channels, 32, 32, generator=g),
                           torch.rand(n_inputs, generator=g) * config.max_timestep,
                           torch.randn(n_inputs, config.text_len, config.text_dim, generator=g))
    return deploy_model(model, width, latent_hw=(32, 32)).fuse_attention(), calib


def child(config_path: str, width: float, forward_batch: int, gradient_batch: int, n_inputs: int) -> dict:
    from edgecompile.compress.importance import measure_statistics
    from edgecompile.compress.palettize_model import palettizable_layers

    deploy, calib = random_graph(config_path, width, n_inputs)
    layers = palettizable_layers(deploy)
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here on
    before = resident_gib()
    marks: list[float] = []
    start = time.perf_counter()
    stats = measure_statistics(deploy, layers, calib, batch_size=forward_batch, gradient_batch_size=gradient_batch,
                               progress=lambda what, done, total: marks.append(round(high_water_gib(), 2)))
    seconds = time.perf_counter() - start
    held = {"fisher_gib": sum(f.numel() * f.element_size() for f in stats.fisher.values()) / 2**30,
            "hessian_gib": sum(h.matrix().numel() * 4 if h.gram is not None else h.columns.numel() * 4
                               for h in {id(h): h for h in stats.hessian.values()}.values()) / 2**30,
            "weights_gib": sum(m.weight.numel() * 4 for m in layers.values()) / 2**30}
    return {"width": width, "inputs": n_inputs, "forward_batch": forward_batch, "gradient_batch": gradient_batch,
            "resident_before_gib": round(before, 2), "peak_gib": round(high_water_gib(), 2), "peak_after_each_batch_gib": marks,
            "resident_after_gib": round(resident_gib(), 2), **{k: round(v, 2) for k, v in held.items()},
            "seconds": round(seconds, 1), "statistics_seconds": round(stats.seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "snapgenpp.yaml"))
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--inputs", type=int, default=58)  # an export's calibration inputs less its held-out fifth (72 -> 58)
    ap.add_argument("--output")
    ap.add_argument("--child", nargs=4, metavar=("WIDTH", "FORWARD", "GRADIENT", "INPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        w, f, g, n = args.child
        print(json.dumps(child(args.config, float(w), int(f), int(g), int(n))))
        return
    rows = []
    for run in args.runs.split(","):
        width, forward_batch, gradient_batch = run.split(":")
        step = _common.run_child([sys.executable, __file__, "--config", args.config, "--child", width, forward_batch, gradient_batch,
                                  str(args.inputs)])
        row = {"run": run, "rc": step["rc"], "wall_s": step["wall_s"]}
        if step["rc"] == 0:
            row.update(json.loads(step["stdout"].strip().splitlines()[-1]))
            print(f"width {width}, forward batch {forward_batch}, backward batch {gradient_batch}: peak {row['peak_gib']} GiB "
                  f"(resident {row['resident_before_gib']} before, {row['resident_after_gib']} after: F {row['fisher_gib']}, "
                  f"H {row['hessian_gib']}, weights {row['weights_gib']} GiB), {row['statistics_seconds']} s", flush=True)
        else:
            row["note"] = "killed or failed (rc < 0: a signal, e.g. the kernel's out-of-memory killer)"
            print(f"width {width}, forward batch {forward_batch}, backward batch {gradient_batch}: rc {step['rc']}", flush=True)
        rows.append(row)
    print("wrote", _common.write_result("statistics_memory", {"config": args.config, "latent": "32x32", "runs": rows},
                                        Path(args.output) if args.output else None))


if __name__ == "__main__":
    main()

"""What activation checkpointing saves in self-distillation: the measured peak resident memory of one training step
(forward + backward of the student: weights frozen, biases and norms trainable) with and without it, against
model/budget.py's estimate, and the step time of both.

    python benchmarks/distill_memory.py [--config recipes/toy.yaml] [--width 1.0] [--latent 32x32] [--batch 8]

Each mode runs in a fresh child process (peak RSS from wait4), random weights, seed 0; the gradients of the two
modes are compared too (checkpointing recomputes, it must not change them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    from edgecompile.compress.distill import detach_trainables
    from edgecompile.deploy.rewrite import deploy_model
    from edgecompile.model.budget import training_activation_bytes
    from edgecompile.model.config import ModelConfig
    from edgecompile.model.dit import EfficientDiT
    from edgecompile.model.elastic import extract_width

    torch.manual_seed(0)
    hw = tuple(int(v) for v in args.latent.split("x"))
    config = ModelConfig.load(args.config)
    student = deploy_model(extract_width(EfficientDiT(config), float(args.width)), latent_hw=hw).fuse_attention()  # as distillation runs it
    student.checkpoint_blocks = args.mode == "checkpointed"
    params = detach_trainables(student)
    c = student.config
    latent = torch.randn(args.batch, c.latent_channels, *hw)
    t = torch.rand(args.batch)
    text = torch.randn(args.batch, c.text_dim, 1, c.text_len)
    with torch.no_grad():
        student(latent[:1], t[:1], text[:1])  # warm-up: allocator pools and lazy init outside the measured step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    student(latent, t, text).pow(2).mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    torch.save(grads, args.grads)
    estimate = training_activation_bytes(config, float(args.width), hw, args.batch, args.mode == "checkpointed")
    print(json.dumps({"step_seconds": round(seconds, 2), "step_peak_growth_gib": round((peak - before) / 2**20, 3),
                      "estimate_gib": round(estimate / 2**30, 3)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "toy.yaml"))
    ap.add_argument("--width", default="1.0")
    ap.add_argument("--latent", default="32x32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--output")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--grads", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    import torch

    result = {"config": args.config, "width": args.width, "latent": args.latent, "batch": args.batch, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("plain", "checkpointed"):
            grads = Path(tmp) / f"{mode}.pt"
            cmd = [sys.executable, __file__, "--config", args.config, "--width", args.width, "--latent", args.latent,
                   "--batch", str(args.batch), "--mode", mode, "--grads", str(grads)]
            with tempfile.TemporaryFile("w+") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, text=True)
                _, status, usage = os.wait4(proc.pid, 0)
                out.seek(0)
                text = out.read()
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"{mode} run failed: {text[-2000:]}")
            result["modes"][mode] = {**json.loads(text.strip().splitlines()[-1]), "process_peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}
            print(mode, result["modes"][mode], flush=True)
        a, b = torch.load(Path(tmp) / "plain.pt"), torch.load(Path(tmp) / "checkpointed.pt")
        result["max_abs_grad_difference"] = float((a - b).abs().max())
    plain, ckpt = result["modes"]["plain"], result["modes"]["checkpointed"]
    result["memory_saving"] = round(plain["step_peak_growth_gib"] / max(ckpt["step_peak_growth_gib"], 1e-3), 2)
    result["time_cost"] = round(ckpt["step_seconds"] / plain["step_seconds"], 2)
    print(f"step peak growth {plain['step_peak_growth_gib']:.2f} -> {ckpt['step_peak_growth_gib']:.2f} GiB "
          f"({result['memory_saving']}x less; estimates {plain['estimate_gib']:.2f} / {ckpt['estimate_gib']:.2f} GiB), "
          f"step time x{result['time_cost']}, gradients differ by at most {result['max_abs_grad_difference']:.2e}")
    path = _common.write_result("distill_memory", result, Path(args.output) if args.output else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Export of the paper-scale supernetwork at full width (1.6B class) for a 1024x1024 image (128x128 latent) on
this machine: wall time and peak resident memory of each step (target: completes, peak under 16 GiB).

    python benchmarks/export_scale.py [--width 1.0] [--latent 128x128] [--workdir DIR] [--output DIR]

Runs `edgecompile init` (random weights, fp16 checkpoint) and `edgecompile export --no-verify` as child
processes and reads their peak RSS from the kernel (getrusage of children).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

EDGECOMPILE = [sys.executable, "-m", "edgecompile.cli"]


def timed(cmd: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
    return {"cmd": " ".join(cmd[2:]), "rc": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak_kib / 2**20, 2), "peak_is_max_so_far": peak_kib == before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "snapgenpp.yaml"))
    ap.add_argument("--width", default="1.0")
    ap.add_argument("--latent", default="128x128")
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgecompile-scale-"))
    ckpt, out = work / "ckpt", work / "out"
    steps = {}
    steps["init"] = timed(EDGECOMPILE + ["init", args.config, "-o", str(ckpt), "--dtype", "float16", "--force"])
    if steps["init"]["rc"] == 0:
        steps["export"] = timed(EDGECOMPILE + ["export", str(ckpt), "--width", args.width, "--latent", args.latent,
                                               "--no-verify", "-o", str(out), "--force", "--json"])
    pkg = next(out.glob("*/*.mlpackage"), None) if out.exists() else None
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()) if pkg else None
    result = {"config": args.config, "width": args.width, "latent": args.latent, "steps": steps,
              "package_bytes": size, "target_peak_gib": 16,
              "completed": all(s["rc"] == 0 for s in steps.values()) and pkg is not None}
    for name, s in steps.items():
        print(f"{name:7s} rc={s['rc']} wall {s['wall_s']:.0f} s, peak RSS {s['peak_rss_gib']:.2f} GiB")
    if size:
        print(f"package {pkg} {size / 2**30:.2f} GiB")
    path = _common.write_result("export_scale", result, Path(args.output) if args.output else None)
    print(f"wrote {path}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

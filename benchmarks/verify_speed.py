"""`verify` against `convert` at paper scale (issue 29, target 1: verification no slower than the conversion it
checks), each a child process measured on its own in one run.

    python benchmarks/verify_speed.py [--width 0.375] [--latent 128x128] [--bits 16] [--workdir DIR] [--output DIR]

1. init: a random paper-scale checkpoint (recipes/snapgenpp.yaml, fp16 weights), kept in --workdir for reruns.
2. convert: `edgecompile export CKPT --width W --bits B --latent L --no-verify`; report.json's `convert` stage.
3. verify: `edgecompile verify PACKAGE --checkpoint CKPT` (the MIL interpreter's fp32 run, the torch reference,
   loading and checking the checkpoint, hashing): the child's whole wall time.
The ratio is verify's wall time over convert's stage time (the export's other stages are not the conversion).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common

EDGECOMPILE = [sys.executable, "-m", "edgecompile"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "snapgenpp.yaml"))
    ap.add_argument("--width", default="0.375")
    ap.add_argument("--latent", default="128x128")
    ap.add_argument("--bits", default="16")
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="verify_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "paper_ckpt"
    result: dict = {"config": args.config, "width": float(args.width), "latent": args.latent, "bits": args.bits}
    if not (ckpt / "model.safetensors").exists():
        step = _common.run_child(EDGECOMPILE + ["init", args.config, "-o", str(ckpt), "--dtype", "float16", "--force"])
        step.pop("stdout", None)
        result["init"] = step
        print("init", step, flush=True)
    out = work / "export"
    step = _common.run_child(EDGECOMPILE + ["export", str(ckpt), "--width", args.width, "--bits", args.bits, "--latent", args.latent,
                                            "--no-verify", "-o", str(out), "--force"])
    if step["rc"] != 0:
        raise SystemExit("the export failed")
    step.pop("stdout", None)
    report = json.loads(next(out.glob("w*/report.json")).read_text())
    package = out / f"w{args.width}" / report["package"]
    convert = report["stage_seconds"]["convert"]
    result["export"] = {**step, "stage_seconds": report["stage_seconds"], "package": str(package)}
    print(f"export: {step['wall_s']} s, convert stage {convert} s, peak {step['peak_rss_gib']} GiB", flush=True)
    step = _common.run_child(EDGECOMPILE + ["verify", str(package), "--checkpoint", str(ckpt), "--json"])
    if step["rc"] != 0:
        raise SystemExit("verify failed")
    verified = json.loads(step.pop("stdout"))
    result["verify"] = {**step, "psnr_db": verified["psnr_db"], "passed": verified["passed"], "runtime": verified["runtime"]}
    ratio = step["wall_s"] / convert
    result["verify_over_convert"] = round(ratio, 2)
    result["holds"] = ratio <= 1.0
    print(f"verify {step['wall_s']} s ({verified['psnr_db']:.1f} dB, {verified['runtime']}, peak {step['peak_rss_gib']} GiB) / "
          f"convert {convert} s = {ratio:.2f} (target <= 1)")
    name = f"verify_speed_w{args.width}_{args.bits}bit_{args.latent}"
    print("wrote", _common.write_result(name, result, Path(args.output) if args.output else None))


if __name__ == "__main__":
    main()

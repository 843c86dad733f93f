"""`verify` against `convert`, and `convert` against coremltools' plain conversion, at paper scale (issue 29,
targets 1 and 4: verification no slower than the conversion it checks, the conversion within 2x a plain one),
each a child process measured on its own in one run.

    python benchmarks/verify_speed.py [--width 0.375] [--latent 128x128] [--bits 16] [--no-plain] [--workdir DIR] [--output DIR]

1. init: a random paper-scale checkpoint (recipes/snapgenpp.yaml, fp16 weights), kept in --workdir for reruns.
2. convert: `edgecompile export CKPT --width W --bits B --latent L --no-verify`; report.json's `convert` stage
   (trace, conversion, LUTs, save), the package's op count and size.
3. verify: `edgecompile verify PACKAGE --checkpoint CKPT` (the MIL interpreter's fp32 run, the torch reference,
   loading and checking the checkpoint, hashing): the child's whole wall time; and its own split (verify --json):
   the package's runs and the torch reference's, verification's floor on this machine, also against convert.
4. plain: coremltools' conversion of the same width's reference model as it is (trace, fp16, the default pass
   pipeline, save), timed inside its child as the convert stage is; its op count and size.
The verify ratio is verify's wall time over convert's stage time (the export's other stages are not the
conversion); the convert ratio is the convert stage over the plain conversion's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import _common

EDGECOMPILE = [sys.executable, "-m", "edgecompile"]


def plain_child(checkpoint: str, width: float, latent: str, out: str) -> None:
    """coremltools' conversion of one width's reference model as it is, with the export's target and precision."""
    import time
    from collections import Counter

    import torch

    from edgecompile.coremltools_loader import import_coremltools
    from edgecompile.model import dit
    from edgecompile.model.checkpoint import load_checkpoint
    from edgecompile.model.elastic import extract_width

    import_coremltools()  # imported before the clock starts, as the export has it
    ckpt = load_checkpoint(checkpoint, width=width)
    model = extract_width(ckpt.model, width, share=True).eval()
    c = ckpt.config
    h, w = (int(v) for v in latent.split("x"))
    # The reference's BNA gathers each block's neighbour keys into a rank-6 tensor, which Core ML refuses (rank <= 5):
    # the plain conversion takes the reference's other formula of the same attention, one dense attention under
    # the (L, L) neighbourhood mask (its path for short sequences)
    dit.DENSE_BNA_MAX_TOKENS = max(dit.DENSE_BNA_MAX_TOKENS, h * w)
    example = (torch.randn(1, c.latent_channels, h, w), torch.tensor([500.0]), torch.randn(1, c.text_len, c.text_dim))
    with torch.no_grad():
        model(*example)  # warm the constant caches (BNA layout, positions) so that the trace sees constants
    start = time.perf_counter()
    ml = _common.plain_conversion(model, example)
    ml.save(out)
    seconds = time.perf_counter() - start
    ops = Counter(op.type for f in ml.get_spec().mlProgram.functions.values() for b in f.block_specializations.values() for op in b.operations)
    print(json.dumps({"convert_seconds": round(seconds, 1), **census(ops, Path(out))}))


def census(ops, package: Path) -> dict:
    return {"ops": sum(ops.values()), "non_const_ops": sum(n for t, n in ops.items() if t != "const"),
            "size_bytes": sum(f.stat().st_size for f in package.rglob("*") if f.is_file()), "op_types": dict(ops.most_common(10))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "snapgenpp.yaml"))
    ap.add_argument("--width", default="0.375")
    ap.add_argument("--latent", default="128x128")
    ap.add_argument("--bits", default="16")
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain coremltools conversion")
    ap.add_argument("--plain-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        return plain_child(args.plain_child[0], float(args.plain_child[1]), args.plain_child[2], args.plain_child[3])
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
    inspected = _common.run_child(EDGECOMPILE + ["inspect", str(package), "--json"])
    ours = census(Counter(json.loads(inspected["stdout"])["ops"]), package) if inspected["rc"] == 0 else {}
    result["export"] = {**step, "stage_seconds": report["stage_seconds"], "package": str(package), **ours}
    print(f"export: {step['wall_s']} s, convert stage {convert} s, peak {step['peak_rss_gib']} GiB, {ours.get('ops')} ops", flush=True)
    step = _common.run_child(EDGECOMPILE + ["verify", str(package), "--checkpoint", str(ckpt), "--json"])
    if step["rc"] != 0:
        raise SystemExit("verify failed")
    verified = json.loads(step.pop("stdout"))
    phases = {k: verified[k] for k in ("package_seconds", "reference_seconds", "chunks_seconds")}
    result["verify"] = {**step, "psnr_db": verified["psnr_db"], "passed": verified["passed"], "runtime": verified["runtime"], **phases}
    ratio = step["wall_s"] / convert
    result["verify_over_convert"] = round(ratio, 2)
    result["holds"] = ratio <= 1.0
    # the floor: running the package and the torch reference on the verification inputs, with nothing read or checked
    floor = sum(phases.values())
    result["package_and_reference_over_convert"] = round(floor / convert, 2)
    print(f"verify {step['wall_s']} s ({verified['psnr_db']:.1f} dB, {verified['runtime']}, peak {step['peak_rss_gib']} GiB) / "
          f"convert {convert} s = {ratio:.2f} (target <= 1); of it the package {phases['package_seconds']} s, the torch reference "
          f"{phases['reference_seconds']} s, chunks alone {phases['chunks_seconds']} s: {floor / convert:.2f}x convert")
    if not args.no_plain:
        step = _common.run_child([sys.executable, __file__, "--plain-child", str(ckpt), args.width, args.latent, str(work / "plain.mlpackage")])
        if step["rc"] == 0:
            step.update(json.loads(step.pop("stdout").strip().splitlines()[-1]))
            ratio = convert / step["convert_seconds"]
            result["convert_over_plain"] = round(ratio, 2)
            result["convert_holds"] = ratio <= 2.0
            print(f"plain coremltools conversion {step['convert_seconds']} s ({step['ops']} ops, {step['size_bytes']:,} B); "
                  f"convert {convert} s ({ours.get('ops')} ops, {ours.get('size_bytes', 0):,} B) = {ratio:.2f}x (target <= 2)")
        else:
            print(f"the plain conversion failed (rc {step['rc']}): {step.get('stdout', '')[-500:]}")
        result["plain"] = step
    name = f"verify_speed_w{args.width}_{args.bits}bit_{args.latent}"
    print("wrote", _common.write_result(name, result, Path(args.output) if args.output else None))


if __name__ == "__main__":
    main()

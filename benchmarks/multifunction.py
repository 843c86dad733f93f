"""One multifunction package for several latent sizes against one package per size, on the bundled checkpoint.

    python benchmarks/multifunction.py [--width 0.5] [--bits 16] [--latents 8x8,16x16,8x16] [--workdir DIR]

Each export is a child process (wall time; peak RSS from wait4), verified and sampled as `edgecompile export`
does by default:
- multi: `export --latent 8x8,16x16,8x16 --target iOS18` (one package, one function per size);
- single: `export --latent S --target iOS18` for each size S (one package each).
Measured: the weight file of the 3-size package against the 1-size package of the first size (goal: within 2%),
the total package size and export time against the 3 separate packages, and each function's verification and
sample figures (final-sample PSNR against the checkpoint, digits classified right).
Results: benchmarks/results/multifunction.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common

from edgecompile.coreml.package import weight_file_bytes

EDGECOMPILE = [sys.executable, "-m", "edgecompile"]


def export(latents: str, out: Path, width: str, bits: str) -> dict:
    step = _common.run_child(EDGECOMPILE + ["export", "--width", width, "--bits", bits, "--latent", latents, "--target", "iOS18",
                                            "-o", str(out), "--force", "--json"])
    step.pop("stdout")
    if step["rc"] != 0:
        return step
    folder = next(out.glob("w*"))
    report = json.loads((folder / "report.json").read_text())
    package = folder / report["package"]
    functions = report.get("functions") or [{"name": None, "latent": report["latent"], "verify": report["verify"]}]
    step.update(size_bytes=report["size_bytes"], weight_file_bytes=weight_file_bytes(package), stage_seconds=report["stage_seconds"],
                functions=[{"name": f["name"], "latent": f["latent"], "verify_psnr_db": f["verify"]["psnr_db"],
                            "sample_psnr_db": (f["verify"].get("generation") or {}).get("psnr_db"),
                            "sample_accuracy": (f["verify"].get("generation") or {}).get("package_accuracy"),
                            "checkpoint_sample_accuracy": (f["verify"].get("generation") or {}).get("checkpoint_accuracy")}
                           for f in functions])
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", default="0.5")
    ap.add_argument("--bits", default="16")
    ap.add_argument("--latents", default="8x8,16x16,8x16")
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgecompile-multifunction-"))
    sizes = args.latents.split(",")
    multi = export(args.latents, work / "multi", args.width, args.bits)
    print(f"multi ({args.latents}): rc={multi['rc']} {multi['wall_s']:.0f} s", flush=True)
    singles = {}
    for size in sizes:
        singles[size] = export(size, work / f"single_{size}", args.width, args.bits)
        print(f"single {size}: rc={singles[size]['rc']} {singles[size]['wall_s']:.0f} s", flush=True)
    result = {"checkpoint": "bundled default", "width": args.width, "bits": args.bits, "latents": sizes, "multi": multi, "singles": singles}
    if multi["rc"] == 0 and all(s["rc"] == 0 for s in singles.values()):
        first = singles[sizes[0]]
        result["comparison"] = {
            "weight_file_bytes": [multi["weight_file_bytes"], first["weight_file_bytes"]],
            "weight_file_vs_one_size_pct": round(100 * (multi["weight_file_bytes"] / first["weight_file_bytes"] - 1), 2),
            "size_bytes": [multi["size_bytes"], sum(s["size_bytes"] for s in singles.values())],
            "export_seconds": [multi["wall_s"], round(sum(s["wall_s"] for s in singles.values()), 1)],
        }
        c = result["comparison"]
        print(f"weight file: {c['weight_file_bytes'][0]:,} B vs {c['weight_file_bytes'][1]:,} B for {sizes[0]} alone "
              f"({c['weight_file_vs_one_size_pct']:+.2f}%); packages {c['size_bytes'][0]:,} B vs {c['size_bytes'][1]:,} B for "
              f"{len(sizes)} separate; export {c['export_seconds'][0]:.0f} s vs {c['export_seconds'][1]:.0f} s")
    print(f"wrote {_common.write_result('multifunction', result, Path(args.output) if args.output else None)}")


if __name__ == "__main__":
    main()

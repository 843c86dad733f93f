"""Compare two export folders of the same width: are they the same package, times aside?

    python scripts/compare_exports.py OUT_A OUT_B [--width 0.5]

Weight files are compared byte for byte; safetensors files (palettes, distilled parameters) by their tensors and
metadata; recipe.json and report.json value for value with timings left out; the package's model.mlmodel as a
protobuf message (coremltools serialises its metadata map in no fixed order), with the recorded digests of
sidecars that compared equal by content left out (files written before the palettes file was made deterministic
differ in bytes only); Manifest.json not at all (coremltools gives every package new random item UUIDs).
Exits 1 when anything differs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgecompile.export_report import without_timings

SIDECARS = ("palettes.safetensors", "distilled.safetensors")


def safetensors_content(path: Path):
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = {k: json.loads(v) if v[:1] in "{[" else v for k, v in (f.metadata() or {}).items()}
        if set(meta) == {"layers"}:  # the palettes file's one entry, or the older one entry per layer
            meta = meta["layers"]
        return meta, {k: np.asarray(f.get_tensor(k)).tobytes() for k in sorted(f.keys())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--width", default="0.5")
    args = parser.parse_args()
    from coremltools.proto import Model_pb2

    a, b = args.a / f"w{args.width}", args.b / f"w{args.width}"
    # the sidecars moved out of Resources/ (what an app bundles) into the width's folder: matched by name
    def listing(root: Path) -> dict[Path, Path]:
        return {Path(p.name) if p.name in SIDECARS else p.relative_to(root): p.relative_to(root) for p in root.rglob("*") if p.is_file()}

    in_a, in_b = listing(a), listing(b)
    if sorted(in_a) != sorted(in_b):
        sys.exit("the two folders hold different files")
    files = sorted(in_a)
    differs = False
    same_content = set()  # sidecars equal by content: their recorded digests may still differ
    for f in sorted(files, key=lambda f: f.suffix != ".safetensors"):
        x, y = (a / in_a[f]).read_bytes(), (b / in_b[f]).read_bytes()
        if f.name == "Manifest.json":
            verdict = "not compared (random item UUIDs)"
        elif f.suffix == ".safetensors":
            equal = x == y or safetensors_content(a / in_a[f]) == safetensors_content(b / in_b[f])
            verdict = ("identical bytes" if x == y else "same tensors and metadata") if equal else "DIFFERS"
            if equal:
                same_content.add(f.name)
        elif f.name == "model.mlmodel":
            ma, mb = Model_pb2.Model(), Model_pb2.Model()
            ma.ParseFromString(x)
            mb.ParseFromString(y)
            for m in (ma, mb):
                for key, sidecar in (("edgecompile.palettes_sha256", "palettes.safetensors"), ("edgecompile.distilled_sha256", "distilled.safetensors")):
                    if sidecar in same_content and key in m.description.metadata.userDefined:
                        del m.description.metadata.userDefined[key]
            verdict = "equal as a message" if ma == mb else "DIFFERS"
        elif f.suffix == ".json":
            da, db = without_timings(json.loads(x)), without_timings(json.loads(y))
            keys = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
            verdict = "same values, timings aside" if not keys else f"DIFFERS in {keys}"
        else:
            verdict = "identical bytes" if x == y else "DIFFERS"
        differs |= "DIFFERS" in verdict
        print(f"{f}: {verdict}")
    sys.exit(1 if differs else 0)


if __name__ == "__main__":
    main()

import json, hashlib, sys
from pathlib import Path
a, b = Path(sys.argv[1]) / "w0.5", Path(sys.argv[2]) / "w0.5"
TIMES = {"seconds", "kmeans_seconds", "forward_seconds", "cost_forward_passes", "stage_seconds", "history_seconds"}
def strip(v, path=""):
    if isinstance(v, dict):
        return {k: strip(x, path + "." + k) for k, x in v.items() if k not in TIMES and not (path.endswith("distill") and k == "seconds")}
    if isinstance(v, list):
        return [strip(x, path) for x in v]
    return v
files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()), "file lists differ"
for f in files:
    x, y = (a / f).read_bytes(), (b / f).read_bytes()
    if f.suffix == ".json" and f.name != "Manifest.json":
        same = strip(json.loads(x)) == strip(json.loads(y))
        if not same:
            dx, dy = strip(json.loads(x)), strip(json.loads(y))
            diff = [k for k in set(dx) | set(dy) if dx.get(k) != dy.get(k)]
            print(f, "DIFFERS in", diff)
            for k in diff: print("  ", k, str(dx.get(k))[:200], "|", str(dy.get(k))[:200])
            continue
        print(f, "same values (times aside)")
    elif f.name in ("Manifest.json", "model.mlmodel"):
        print(f, "skipped here (coremltools: random UUIDs / map order); compared as a message below")
    else:
        print(f, "identical bytes" if x == y else "DIFFERS")
from coremltools.proto import Model_pb2
ms = []
for d in (a, b):
    m = Model_pb2.Model(); m.ParseFromString(next(d.rglob("model.mlmodel")).read_bytes()); ms.append(m)
print("model.mlmodel equal as a message:", ms[0] == ms[1])

"""edgecompile's fp16-histogram k-means versus coremltools 9.0's own k-means (the one palettize_weights calls:
exact 1-D DP over np.unique values for fp16 tensors >= 10k elements, scikit-learn KMeans below that).

Prints, per tensor and bit-width: time of each (median of --repeats calls, after a warm-up), speed ratio, and MSE
ratio (ours / coremltools'; target <= 1.001) on a 4096x4096 fp16 tensor (per tensor and with group size 32) and on
real weights of the bundled checkpoint. Then the clustering alone against the exact DP on every distinct value, on
synthetic shapes (normal, Laplace, Student-t, bimodal) and the same tensors, at 4, 6 and 8 bits.

    python benchmarks/kmeans_speed.py [--output DIR] [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np
from rich.console import Console
from rich.table import Table

from edgecompile.compress.kmeans import palettize
from edgecompile.coremltools_loader import import_coremltools, quiet_coremltools


def coremltools_kmeans(weight: np.ndarray, nbits: int, group_size: int | None):
    """coremltools' k-means on each group of output channels (as palettize_weights does per group)."""
    import_coremltools()
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    rows = weight.shape[0]
    g = group_size or rows
    out = np.empty_like(weight)
    with quiet_coremltools():
        for r in range(0, rows, g):
            block = weight[r : r + g]
            lut, idx = _get_kmeans_lookup_table_and_weight(nbits, block)
            out[r : r + g] = lut.astype(np.float16).reshape(-1)[np.asarray(idx).reshape(-1)].reshape(block.shape)
    return out


def mse(a, b) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def timed(fn, repeats: int):
    """(result, median seconds over `repeats` calls)."""
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t)
    return out, float(np.median(seconds))


def measure(name: str, weight: np.ndarray, nbits: int, group_size: int | None, repeats: int) -> dict:
    ours, t_ours = timed(lambda: palettize(weight, nbits, group_size).decode(), repeats)
    theirs, t_ct = timed(lambda: coremltools_kmeans(weight, nbits, group_size), repeats)
    m_ours, m_ct = mse(ours, weight), mse(theirs, weight)
    return {"tensor": name, "shape": list(weight.shape), "nbits": nbits, "group_size": group_size, "repeats": repeats,
            "seconds_edgecompile": t_ours, "seconds_coremltools": t_ct, "speedup": t_ct / t_ours,
            "mse_edgecompile": m_ours, "mse_coremltools": m_ct, "mse_ratio": m_ours / m_ct if m_ct else 1.0}


def exactness(tensors: dict[str, np.ndarray], bits=(4, 6, 8)) -> list[dict]:
    """Our clustering's error against the exact DP on every distinct value (coremltools' own exact algorithm, run
    on the same histogram in float64, so fp16 rounding of the LUT plays no part): the k-means alone."""
    from edgecompile.compress import kmeans as km

    rows = []
    for name, w in tensors.items():
        values, counts, _ = km._sorted_support(km.fp16_histogram(w.view(np.uint16)))
        x = values - np.average(values, weights=counts)
        prefix = km.prefix_sums(x, counts)
        for nbits in bits:
            _, segment = km.kmeans_histogram(values, counts, 1 << nbits)
            ours = np.concatenate([[0], np.flatnonzero(np.diff(segment)) + 1, [len(values)]])
            exact = km._exact_dp(x, counts, 1 << nbits)
            rows.append({"tensor": name, "nbits": nbits, "distinct_values": len(values),
                         "sse_ratio": km._sse(ours, *prefix) / km._sse(exact, *prefix)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output")
    ap.add_argument("--quick", action="store_true", help="skip the grouped 4096x4096 case")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case; the median is reported")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    from edgecompile.model.checkpoint import load_checkpoint

    rows = []
    big = (np.random.default_rng(0).standard_normal((4096, 4096)) * 0.02).astype(np.float16)
    cases = [("random 4096x4096", big, 4, None), ("random 4096x4096", big, 8, None)]
    if not args.quick:
        cases.append(("random 4096x4096", big, 4, 32))
    ckpt = load_checkpoint()
    state = ckpt.model.state_dict()
    for name in ("middle.0.ffn.fc1.weight", "down.0.attn.q.weight", "up.2.ffn.fc2.weight"):
        w = state[name].numpy().astype(np.float16)
        cases += [(f"default ckpt {name}", w, 4, None), (f"default ckpt {name}", w, 8, None)]
    warm = big[:64]  # imports and first-call costs stay out of the timings
    palettize(warm, 8)
    coremltools_kmeans(warm, 8, None)
    for case in cases:
        rows.append(measure(*case, args.repeats))
    table = Table(title="k-means palettization: edgecompile vs coremltools 9.0 (same fp16 tensor)")
    for col in ("tensor", "bits", "group", "edgecompile s", "coremltools s", "speedup", "MSE ratio"):
        table.add_column(col, justify="right" if col != "tensor" else "left")
    for r in rows:
        table.add_row(r["tensor"], str(r["nbits"]), str(r["group_size"] or "-"), f"{r['seconds_edgecompile']:.3f}",
                      f"{r['seconds_coremltools']:.3f}", f"{r['speedup']:.1f}x", f"{r['mse_ratio']:.5f}")
    Console().print(table)
    rng = np.random.default_rng(1)
    shapes = {"normal": rng.standard_normal, "laplace": lambda s: rng.laplace(size=s), "student-t 3": lambda s: rng.standard_t(3, s),
              "bimodal": lambda s: np.where(rng.random(s) < 0.7, rng.normal(-2.5, 0.5, s), rng.normal(1.5, 0.25, s))}
    tensors = {f"{k} 1024x1024": (f((1024, 1024)) * 0.02).astype(np.float16) for k, f in shapes.items()}
    tensors |= {"random 4096x4096": big} | {f"default ckpt {n}": state[n].numpy().astype(np.float16)
                                            for n in ("middle.0.ffn.fc1.weight", "down.0.attn.q.weight", "up.2.ffn.fc2.weight")}
    exact_rows = exactness(tensors)
    worst = max(exact_rows, key=lambda r: r["sse_ratio"])
    print(f"k-means error / exact DP error over {len(exact_rows)} tensor x bit-width cases: worst {worst['sse_ratio']:.5f} "
          f"({worst['tensor']}, {worst['nbits']}-bit), median {np.median([r['sse_ratio'] for r in exact_rows]):.5f}")
    path = _common.write_result("kmeans_speed", {"cases": rows, "exactness": exact_rows, "worst_sse_ratio_vs_exact": worst["sse_ratio"]},
                                Path(args.output) if args.output else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

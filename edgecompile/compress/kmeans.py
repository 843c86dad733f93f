"""Fast k-means palettization of fp16 weights.

An fp16 tensor has at most 65,536 distinct values, so clustering works on its histogram, never on the
elements. The histogram is one `bincount` over the uint16 view (no sort of the N elements, which is what
makes coremltools' `np.unique` path slow). Weighted 1-D Lloyd on the sorted histogram costs O(k log n) per
iteration with prefix sums (boundaries are midpoints between sorted centroids, found by `searchsorted`), so it
runs to convergence from several starts, the best kept. One start is the MSE-optimal companding density
(point density proportional to p(x)^(1/3)), which lands next to the global optimum; benchmarks/kmeans_speed.py
compares the MSE with coremltools' exact dynamic-programming k-means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecompile.errors import EdgeCompileError

MAX_LLOYD_ITERATIONS = 1000


@dataclass
class Palette:
    """lut (G, 2^nbits) fp16 per group; indices (same shape as the weight) uint8; groups of `group_size`
    output channels (axis 0), or one group (per tensor) when group_size is None."""

    lut: np.ndarray
    indices: np.ndarray
    nbits: int
    group_size: int | None

    def decode(self) -> np.ndarray:
        rows = self.indices.shape[0]
        g = self.group_size or rows
        group_of_row = np.arange(rows) // g
        flat = self.indices.reshape(rows, -1)
        return self.lut[group_of_row[:, None], flat].reshape(self.indices.shape)


def fp16_histogram(codes: np.ndarray, n_groups: int = 1, group_ids: np.ndarray | None = None) -> np.ndarray:
    """(n_groups, 65536) counts of each fp16 bit pattern, in one pass."""
    keys = codes.astype(np.int64) if group_ids is None else codes.astype(np.int64) + group_ids.astype(np.int64) * 65536
    return np.bincount(keys, minlength=65536 * n_groups).reshape(n_groups, 65536)


def _sorted_support(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values (sorted, float64), their counts and fp16 codes."""
    codes = np.flatnonzero(counts).astype(np.uint16)
    values = codes.view(np.float16).astype(np.float64)
    order = np.argsort(values, kind="stable")
    return values[order], counts[codes[order]].astype(np.float64), codes[order]


def _segment_means(bounds: np.ndarray, w_cum: np.ndarray, s1_cum: np.ndarray) -> np.ndarray:
    wsum = w_cum[bounds[1:]] - w_cum[bounds[:-1]]
    ssum = s1_cum[bounds[1:]] - s1_cum[bounds[:-1]]
    return ssum / np.maximum(wsum, 1e-300), wsum


def _sse(bounds, w_cum, s1_cum, s2_cum) -> float:
    w = w_cum[bounds[1:]] - w_cum[bounds[:-1]]
    s1 = s1_cum[bounds[1:]] - s1_cum[bounds[:-1]]
    s2 = s2_cum[bounds[1:]] - s2_cum[bounds[:-1]]
    return float(np.sum(s2 - np.where(w > 0, s1 * s1 / np.maximum(w, 1e-300), 0.0)))


def _lloyd(values, bounds, w_cum, s1_cum) -> np.ndarray:
    """Weighted 1-D Lloyd on sorted values; a cluster is the segment values[bounds[i]:bounds[i+1]]."""
    k = len(bounds) - 1
    for _ in range(MAX_LLOYD_ITERATIONS):
        means, wsum = _segment_means(bounds, w_cum, s1_cum)
        live = wsum > 0
        c = means[live]
        mids = (c[:-1] + c[1:]) / 2
        inner = np.searchsorted(values, mids, side="right")
        new = np.concatenate([[0], inner, [len(values)]])
        if len(new) < k + 1:  # an empty cluster: split the heaviest-error segment to keep k clusters
            new = _refill(new, k, len(values))
        if np.array_equal(new, bounds):
            break
        bounds = new
    return bounds


def _refill(bounds: np.ndarray, k: int, n: int) -> np.ndarray:
    """Split the largest segments at their midpoints until there are k (vectorised: many splits per pass)."""
    bounds = np.asarray(bounds)
    while len(bounds) < k + 1:
        sizes = np.diff(bounds)
        splittable = np.flatnonzero(sizes >= 2)
        if len(splittable) == 0:
            break
        need = k + 1 - len(bounds)
        largest = splittable[np.argsort(-sizes[splittable], kind="stable")[:need]]
        bounds = np.sort(np.concatenate([bounds, bounds[largest] + sizes[largest] // 2]))
    return bounds


def _init_by_density(values, weights, k, power: float) -> np.ndarray:
    """Boundaries at equal quantiles of the integral of p(x)**power over x, p the value density
    (power 1: equal mass; 1/3: the MSE-optimal companding density; 0: equal width).

    fp16 values are log-spaced, so the density at a value is its count divided by its spacing."""
    spacing = np.gradient(values) if len(values) > 1 else np.ones(1)
    spacing = np.maximum(spacing, np.min(spacing[spacing > 0]) if (spacing > 0).any() else 1.0)
    cum = np.cumsum((weights / spacing) ** power * spacing)
    targets = cum[-1] * np.arange(1, k) / k
    inner = np.searchsorted(cum, targets, side="left") + 1
    bounds = np.unique(np.concatenate([[0], np.clip(inner, 1, len(values) - 1), [len(values)]]))
    return _refill(bounds, k, len(values))


COARSE_BINS_PER_CLUSTER = 16  # super-bins for the exact DP start (4096 at 8 bits)
EXACT_DP_MAX_WORK = 1 << 16  # clusters x distinct values up to which the exact DP runs on every value (<= ~0.07 s)
DP_START_MIN_CLUSTERS = 16


def _coarse_exact_start(x, weights, k, w_cum, s1_cum) -> np.ndarray:
    """Exact DP k-means (coremltools' bundled kmeans1d) on 16 companding-quantile super-bins per cluster: a start
    next to the global optimum that Lloyd alone misses for large k, at a fraction of the DP's cost on all values."""
    from edgecompile.coreml.convert import import_coremltools

    import_coremltools()  # quiet import first: coremltools prints warnings on import
    from coremltools._deps import kmeans1d  # the exact O(kn) DP coremltools itself uses

    n_bins = len(x) if k * len(x) <= EXACT_DP_MAX_WORK else min(COARSE_BINS_PER_CLUSTER * k, len(x))
    bins = _init_by_density(x, weights, n_bins, 1 / 3) if n_bins < len(x) else np.arange(len(x) + 1)
    means, mass = _segment_means(bins, w_cum, s1_cum)
    clusters = np.asarray(kmeans1d.cluster(means.tolist(), k, weights=mass.tolist()).clusters)
    return np.concatenate([[0], bins[np.flatnonzero(np.diff(clusters)) + 1], [len(x)]])


def kmeans_histogram(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster sorted weighted values into at most k clusters; returns (centroids, segment id per value)."""
    n = len(values)
    if n <= k:
        return values.copy(), np.arange(n)
    shift = np.average(values, weights=weights)  # centre for numerically safe prefix sums
    x = values - shift
    w_cum = np.concatenate([[0.0], np.cumsum(weights)])
    s1_cum = np.concatenate([[0.0], np.cumsum(weights * x)])
    s2_cum = np.concatenate([[0.0], np.cumsum(weights * x * x)])
    starts = [_init_by_density(x, weights, k, power) for power in (1 / 3, 1.0)]
    # Lloyd alone reaches <= 0.02% of the optimum on large 4-bit tensors, not at 8 bits or on small tensors
    if k > DP_START_MIN_CLUSTERS or k * n <= EXACT_DP_MAX_WORK:
        starts.append(_coarse_exact_start(x, weights, k, w_cum, s1_cum))
    best, best_sse = None, np.inf
    for start in starts:
        bounds = _lloyd(x, start, w_cum, s1_cum)
        sse = _sse(bounds, w_cum, s1_cum, s2_cum)
        if sse < best_sse:
            best, best_sse = bounds, sse
    means, _ = _segment_means(best, w_cum, s1_cum)
    segment = np.repeat(np.arange(len(best) - 1), np.diff(best))
    return means + shift, segment


def palettize(weight: np.ndarray, nbits: int, group_size: int | None = None) -> Palette:
    """k-means palettize an fp16 (or fp32, cast to fp16) weight to 2^nbits entries per group of output channels."""
    if nbits not in (1, 2, 3, 4, 6, 8):
        raise EdgeCompileError(f"{nbits}-bit palettization is not supported: use 1, 2, 3, 4, 6 or 8 bits")
    w16 = np.ascontiguousarray(weight, dtype=np.float16)
    if not np.isfinite(w16).all():
        raise EdgeCompileError("cannot palettize a weight with inf/nan values (after the fp16 cast)")
    rows = w16.shape[0]
    g = group_size or rows
    if rows % g:
        raise EdgeCompileError(f"--group-size {g} does not divide the {rows} output channels of a weight")
    n_groups = rows // g
    codes = w16.reshape(rows, -1).view(np.uint16)
    group_ids = np.repeat(np.arange(n_groups), g * codes.shape[1]) if n_groups > 1 else None
    hist = fp16_histogram(codes.ravel(), n_groups, group_ids)
    k = 1 << nbits
    lut = np.zeros((n_groups, k), dtype=np.float16)
    code_to_index = np.zeros((n_groups, 65536), dtype=np.uint8)
    for gi in range(n_groups):
        values, counts, support_codes = _sorted_support(hist[gi])
        centroids, segment = kmeans_histogram(values, counts, k)
        lut[gi, : len(centroids)] = centroids.astype(np.float16)
        code_to_index[gi, support_codes] = segment
    row_group = (np.arange(rows) // g)[:, None]
    indices = code_to_index[row_group, codes].reshape(w16.shape)
    return Palette(lut=lut, indices=indices, nbits=nbits, group_size=group_size)

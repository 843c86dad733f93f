"""Fast k-means palettization of fp16 weights.

An fp16 tensor has at most 65,536 distinct values, so clustering works on its histogram, never on the
elements. The histogram is one `bincount` over the uint16 view (no sort of the N elements, which is what
makes coremltools' `np.unique` path slow). With prefix sums of the sorted histogram, any cluster's error is
O(1), so the exact 1-D DP (coremltools' own algorithm, O(k n)) can run on a few hundred super-bins and then be
refined by a banded DP: the same DP with each boundary confined to a window around its current place, which
costs a (2r+1)^2 min-plus step per cluster and finds the best joint move of all boundaries, where Lloyd only
moves one at a time. benchmarks/kmeans_speed.py compares time and MSE with coremltools' exact k-means.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edgecompile.coremltools_loader import kmeans1d
from edgecompile.errors import EdgeCompileError

MAX_LLOYD_ITERATIONS = 1000
PARALLEL_MIN_ELEMENTS = 1 << 22  # tensors this large split their element passes across the cores


def _map_chunks(fn, flat: np.ndarray) -> list:
    """fn over one contiguous chunk of a 1-D array per core. The element passes (bincount, table gathers)
    release the GIL, so threads run them in parallel; small tensors stay on one thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if flat.size < PARALLEL_MIN_ELEMENTS or cores == 1:
        return [fn(flat)]
    with ThreadPoolExecutor(cores) as pool:
        return list(pool.map(fn, np.array_split(flat, cores)))


@dataclass
class Palette:
    """lut (G, 2^nbits) fp16 per group; indices (same shape as the weight) uint8; groups of `group_size`
    output channels (axis 0), or one group (per tensor) when group_size is None."""

    lut: np.ndarray
    indices: np.ndarray
    nbits: int
    group_size: int | None

    def decode(self) -> np.ndarray:
        blocks = self.indices.reshape(len(self.lut), -1)  # one block of rows per LUT
        out = np.empty(blocks.shape, dtype=np.float16)
        for lut, block, row in zip(self.lut, blocks, out):
            row[:] = _gather(lut, block)
        return out.reshape(self.indices.shape)


def _gather(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """table[keys] for a 1-D table: the fastest numpy lookup (a broadcast 2-D index took 1.5x as long)."""
    return np.concatenate(_map_chunks(lambda part: table[part], keys.ravel()))


def fp16_histogram(codes: np.ndarray) -> np.ndarray:
    """Counts (65536,) of each fp16 bit pattern in uint16 codes, one bincount pass (no sort of the elements)."""
    return sum(_map_chunks(lambda part: np.bincount(part, minlength=65536), codes.ravel()))


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


def _companding_bounds(values, weights, k) -> np.ndarray:
    """Boundaries at equal quantiles of the integral of p(x)**(1/3), p the value density: the MSE-optimal
    companding density of high-resolution quantization theory.

    fp16 values are log-spaced, so the density at a value is its count divided by its spacing."""
    spacing = np.gradient(values) if len(values) > 1 else np.ones(1)
    spacing = np.maximum(spacing, np.min(spacing[spacing > 0]) if (spacing > 0).any() else 1.0)
    cum = np.cumsum((weights / spacing) ** (1 / 3) * spacing)
    targets = cum[-1] * np.arange(1, k) / k
    inner = np.searchsorted(cum, targets, side="left") + 1
    bounds = np.unique(np.concatenate([[0], np.clip(inner, 1, len(values) - 1), [len(values)]]))
    return _refill(bounds, k, len(values))


def prefix_sums(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative weight, weighted sum and weighted sum of squares, each with a leading 0, so that any segment's
    squared error is O(1) (`_sse`)."""
    w_cum = np.concatenate([[0.0], np.cumsum(weights)])
    s1_cum = np.concatenate([[0.0], np.cumsum(weights * x)])
    s2_cum = np.concatenate([[0.0], np.cumsum(weights * x * x)])
    return w_cum, s1_cum, s2_cum


def _banded_dp(bounds, radius, w_cum, s1_cum, s2_cum):
    """The exact k-means DP with boundary i restricted to bounds[i] +- radius[i].

    Cost O(sum of window products) instead of O(k n): a (2r+1)^2 min-plus step per cluster, one numpy call
    each. Returns the best boundaries in the band and the windows' ends (to tell whether a boundary hit one)."""
    n, k = int(bounds[-1]), len(bounds) - 1
    lo = np.maximum(bounds[1:-1] - radius, 1)
    hi = np.minimum(bounds[1:-1] + radius, n - 1)
    sizes = hi - lo + 1
    split = np.cumsum(sizes)[:-1]
    flat = np.repeat(lo - np.concatenate([[0], split]), sizes) + np.arange(sizes.sum())  # every window's indices
    cands = [*np.split(flat, split), np.array([n])]
    cw = [*np.split(w_cum[flat], split), w_cum[[n]]]
    c1 = [*np.split(s1_cum[flat], split), s1_cum[[n]]]
    c2 = [*np.split(s2_cum[flat], split), s2_cum[[n]]]
    pw, p1, p2, best = w_cum[:1], s1_cum[:1], s2_cum[:1], np.zeros(1)
    back = []
    for m in range(k):
        dw = cw[m][None, :] - pw[:, None]
        d1 = c1[m][None, :] - p1[:, None]
        total = best[:, None] + (c2[m][None, :] - p2[:, None]) - d1 * d1 / np.maximum(dw, 0.5)
        total[dw <= 0] = np.inf  # every value has weight >= 1, so dw <= 0 is an empty or reversed cluster
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(total.shape[1])]
        back.append(arg)
        pw, p1, p2 = cw[m], c1[m], c2[m]
    out = np.empty(k + 1, dtype=np.int64)
    out[0], out[k] = 0, n
    j = back[k - 1][0]
    for m in range(k - 2, -1, -1):
        out[m + 1] = cands[m][j]
        j = back[m][j]
    return out, lo, hi


def _refine(bounds, w_cum, s1_cum, s2_cum, radius: int) -> np.ndarray:
    """Banded DP until no boundary sits on its window's end, doubling the window of those that do.

    The result is optimal against every joint move of all boundaries within their windows, which Lloyd (one
    boundary at a time, to a local optimum) is not: this is what closes the last 0.05% to the exact DP."""
    n = len(w_cum) - 1
    r = np.full(len(bounds) - 2, max(int(radius), 1))
    for _ in range(MAX_BAND_ROUNDS):
        new, lo, hi = _banded_dp(bounds, r, w_cum, s1_cum, s2_cum)
        inner = new[1:-1]
        hit = ((inner == lo) & (lo > 1)) | ((inner == hi) & (hi < n - 1))
        bounds = new
        if not hit.any():
            break
        r[hit] = np.minimum(r[hit] * 2, MAX_BAND_RADIUS)
    return bounds


BINS_PER_CLUSTER = 16  # companding-quantile super-bins per cluster, at most MAX_BINS
MAX_BINS = 2048
EXACT_DP_MAX_WORK = 1 << 17  # bins x clusters for the exact DP (~30 ms); beyond it, the DP sees every s-th bin
BAND_CLUSTERS = 4  # level 2: each boundary may move by this many clusters' worth of bins
MAX_BAND_ROUNDS = 30
MAX_BAND_RADIUS = 256


def _exact_dp(means, mass, k) -> np.ndarray:
    """The exact DP on weighted sorted points; returns cluster boundaries."""
    clusters = np.asarray(kmeans1d().cluster(means.tolist(), k, weights=mass.tolist()).clusters)
    return np.concatenate([[0], np.flatnonzero(np.diff(clusters)) + 1, [len(means)]])


def kmeans_histogram(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster sorted weighted values into at most k clusters; returns (centroids, segment id per value).

    Three levels, each exact within its reach:
    1. the exact DP on at most EXACT_DP_MAX_WORK / k super-bins (every s-th companding-quantile bin, `_companding_bounds`), which
       settles the global layout, e.g. how many clusters each tail gets;
    2. banded DP on all the bins, each boundary free to move by BAND_CLUSTERS clusters' worth
       of bins (a near-tie in the layout, one cluster more in one tail, is a joint shift of every boundary);
    3. banded DP on every distinct value, radius one bin, then Lloyd."""
    n = len(values)
    if n <= k:
        return values.copy(), np.arange(n)
    shift = np.average(values, weights=weights)  # centre for numerically safe prefix sums
    x = values - shift
    w_cum, s1_cum, s2_cum = prefix_sums(x, weights)
    n_bins = min(n, BINS_PER_CLUSTER * k, MAX_BINS)
    bins = _companding_bounds(x, weights, n_bins) if n_bins < n else np.arange(n + 1)
    n_bins = len(bins) - 1
    stride = -(-n_bins * k // EXACT_DP_MAX_WORK)
    coarse = np.unique(np.concatenate([np.arange(0, n_bins, stride), [n_bins]]))  # indices into bins
    mass = np.diff(w_cum[bins[coarse]])
    bounds = coarse[_exact_dp(np.diff(s1_cum[bins[coarse]]) / mass, mass, k)]
    if stride > 1:
        bw, b1, b2 = w_cum[bins], s1_cum[bins], s2_cum[bins]
        bounds = _refine(bounds, bw, b1, b2, max(stride, BAND_CLUSTERS * n_bins // k))
    bounds = bins[bounds]
    if n_bins < n:
        bounds = _refine(_lloyd(x, bounds, w_cum, s1_cum), w_cum, s1_cum, s2_cum, np.median(np.diff(bins)))
    bounds = _lloyd(x, bounds, w_cum, s1_cum)
    means, _ = _segment_means(bounds, w_cum, s1_cum)
    segment = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    return means + shift, segment


NON_FINITE_CODES = np.flatnonzero((np.arange(65536) & 0x7C00) == 0x7C00)  # fp16 exponent all ones: inf, nan


def palettize(weight: np.ndarray, nbits: int, group_size: int | None = None, importance: np.ndarray | None = None) -> Palette:
    """k-means palettize an fp16 (or fp32, cast to fp16) weight to 2^nbits entries per group of output channels.

    `importance` (the weight's shape, > 0) weights each element's squared error: the histogram then sums the
    weights of the elements holding each fp16 value instead of counting them, and the same DP runs on it.
    Either way each element takes its nearest LUT entry (`nearest_indices`), so a palette is a function of the
    weight and its LUT alone."""
    if nbits not in (1, 2, 3, 4, 6, 8):
        raise EdgeCompileError(f"{nbits}-bit palettization is not supported: use 1, 2, 3, 4, 6 or 8 bits")
    w16 = np.ascontiguousarray(weight, dtype=np.float16)
    rows = w16.shape[0]
    g = group_size or rows
    if rows % g:
        raise EdgeCompileError(f"--group-size {g} does not divide the {rows} output channels of a weight")
    n_groups = rows // g
    blocks = w16.reshape(n_groups, -1).view(np.uint16)  # groups of g output channels, contiguous
    weights = None if importance is None else np.asarray(importance, dtype=np.float64).reshape(n_groups, -1)
    k = 1 << nbits
    lut = np.zeros((n_groups, k), dtype=np.float16)
    for i, (codes, group_lut) in enumerate(zip(blocks, lut)):
        hist = fp16_histogram(codes)
        if hist[NON_FINITE_CODES].any():
            raise EdgeCompileError("cannot palettize a weight with inf/nan values (after the fp16 cast)")
        values, counts, support_codes = _sorted_support(hist)
        if weights is not None:
            mass = np.bincount(codes, weights=weights[i], minlength=65536)[support_codes]
            counts = mass / mass.min()  # every value weighs >= 1 (the DP's empty-cluster test relies on it)
        centroids, _ = kmeans_histogram(values, counts, k)
        group_lut[: len(centroids)] = centroids.astype(np.float16)
    return palette_from_lut(w16, lut, nbits, group_size)


_FP16_VALUES = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)  # every fp16 code's value


def nearest_indices(codes: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """The index of the nearest LUT entry of each fp16 code (uint16 view); a value midway goes to the larger entry,
    as in Lloyd's step. One 65,536-entry table per LUT, then one gather over the elements."""
    entries = lut.astype(np.float64)
    order = np.argsort(entries, kind="stable")
    mids = (entries[order][:-1] + entries[order][1:]) / 2
    table = order[np.searchsorted(mids, _FP16_VALUES, side="right")].astype(np.uint8)
    return _gather(table, codes)


def palette_from_lut(weight: np.ndarray, lut: np.ndarray, nbits: int, group_size: int | None) -> Palette:
    """The palette of `weight` with these LUTs (G, 2^nbits): every element takes its nearest entry (k-means'
    own assignment; output-aware palettes then change indices, compress/rounding.py)."""
    w16 = np.ascontiguousarray(weight, dtype=np.float16)
    lut = np.asarray(lut, dtype=np.float16)
    blocks = w16.reshape(len(lut), -1).view(np.uint16)
    indices = np.stack([nearest_indices(codes, group_lut) for codes, group_lut in zip(blocks, lut)])
    return Palette(lut=lut, indices=indices.reshape(w16.shape), nbits=nbits, group_size=group_size)

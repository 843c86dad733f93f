"""Bit allocation from a sensitivity sweep: start every layer at the lowest candidate bit-width and upgrade the
layers that buy the largest sensitivity reduction per extra bit, until a target average (or a target PSNR)."""

from __future__ import annotations

import math
from typing import Callable


def average_bits(bits: dict[str, int], sizes: dict[str, int]) -> float:
    total = sum(sizes[n] for n in bits)
    return sum(bits[n] * sizes[n] for n in bits) / total if total else 0.0


def greedy(sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], candidates: list[int],
           target_bits: float = math.inf) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Upgrade, one at a time, the (layer, higher bit-width) with the largest sensitivity reduction per added
    weight bit that keeps the average within `target_bits`. Returns the bits and the upgrade order."""
    cands = sorted(candidates)
    bits = dict.fromkeys(sensitivity, cands[0])
    total = sum(sizes[n] for n in bits)
    budget = target_bits * total - cands[0] * total
    order = []
    while True:
        best, best_ratio = None, 0.0
        for name, cur in bits.items():
            for nb in cands:
                if nb <= cur:
                    continue
                cost = (nb - cur) * sizes[name]
                if cost > budget + 1e-9:
                    continue
                ratio = (sensitivity[name][cur] - sensitivity[name][nb]) / cost
                if ratio > best_ratio:
                    best, best_ratio = (name, nb, cost), ratio
        if best is None:
            return bits, order
        name, nb, cost = best
        bits[name] = nb
        budget -= cost
        order.append((name, nb))


def allocate_for_psnr(sensitivity, sizes, candidates, target_psnr_db: float,
                      measure_psnr: Callable[[dict[str, int]], float]) -> tuple[dict[str, int], float]:
    """The fewest greedy upgrades whose measured PSNR reaches the target (binary search over the greedy order,
    about log2(upgrades) measurements). Returns (bits, measured PSNR); all-max bits when the target is out of reach."""
    lowest = dict.fromkeys(sensitivity, min(candidates))
    _, order = greedy(sensitivity, sizes, candidates)

    def state(k: int) -> dict[str, int]:
        bits = dict(lowest)
        for name, nb in order[:k]:
            bits[name] = nb
        return bits

    lo, hi = 0, len(order)
    psnr_hi = measure_psnr(state(hi))
    if psnr_hi < target_psnr_db:
        return state(hi), psnr_hi
    best = (hi, psnr_hi)
    while lo < hi:
        mid = (lo + hi) // 2
        p = measure_psnr(state(mid))
        if p >= target_psnr_db:
            hi, best = mid, (mid, p)
        else:
            lo = mid + 1
    return state(best[0]), best[1]


def threshold_allocation(psnr_db: dict[str, dict[int, float]], sizes: dict[str, int], candidates: list[int],
                         target_bits: float) -> tuple[dict[str, int], float]:
    """Apple's recipe rule (ml-stable-diffusion mixed-bit palettization): each layer takes the lowest bit-width
    whose single-layer end-to-end PSNR clears a threshold; the threshold is the highest whose average bits stays
    within the target. Returns (bits, threshold)."""
    cands = sorted(candidates)

    def bits_for(threshold: float) -> dict[str, int]:
        return {n: next((b for b in cands if psnr_db[n][b] >= threshold), cands[-1]) for n in psnr_db}

    values = sorted({v for per in psnr_db.values() for v in per.values() if math.isfinite(v)})
    best_bits, best_t = bits_for(-math.inf), -math.inf
    lo, hi = 0, len(values) - 1
    while lo <= hi:  # average bits grows with the threshold: find the largest threshold within budget
        mid = (lo + hi) // 2
        b = bits_for(values[mid])
        if average_bits(b, sizes) <= target_bits + 1e-9:
            best_bits, best_t, lo = b, values[mid], mid + 1
        else:
            hi = mid - 1
    return best_bits, best_t

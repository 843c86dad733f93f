"""Fidelity metrics."""

from __future__ import annotations

import numpy as np


def psnr_db(reference, output) -> float:
    """Apple's parity metric (ml-stable-diffusion, ml-ane-transformers): 20 log10(max|ref| / RMSE(ref, out))."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if not (np.isfinite(ref).all() and np.isfinite(out).all()):
        return float("nan")  # no fidelity to measure: every gate treats NaN as a failure
    rmse = np.sqrt(np.mean((ref - out) ** 2))
    peak = np.max(np.abs(ref))
    if rmse == 0:
        return float("inf")
    return float(20 * np.log10(peak / rmse))

"""Fidelity metrics."""

from __future__ import annotations

import numpy as np
import torch


def all_finite(t: torch.Tensor) -> bool:
    """`torch.isfinite(t).all()` at the cost of one sum (3-5x faster on CPU for half-precision tensors
    of 50M elements, measured here): a sum is finite exactly when every element is, since NaN and infinities
    propagate and the accumulator cannot overflow (float32 for float16's 65504 range, float64 for bfloat16 and
    float32; a float64 tensor could overflow its own type, so it takes the element-wise test)."""
    if not t.is_floating_point():
        return True
    if t.dtype == torch.float64:
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float32 if t.dtype == torch.float16 else torch.float64)))


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

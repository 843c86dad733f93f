"""Error-compensating assignment of weights to LUT entries (OPTQ/GPTQ's rounding, with a palette for a grid).

Nearest-entry assignment minimises each weight's own error. What the package is judged by is the layer's output
error tr(dW H dW^T), H = sum of x x^T over the calibration inputs (importance.py). OPTQ assigns one column
(input channel) at a time and moves the columns not yet assigned so that they cancel the error just made, the
optimal update under H; with H's inverse Cholesky factor U this is one outer-product update per column, done
in blocks of BLOCK columns so that most of the work is matrix products. The LUT stays what k-means chose: only
the indices change, and the package stores exactly these LUTs and indices.
"""

from __future__ import annotations

import torch

BLOCK = 128
DAMPING = 0.01  # of the mean of H's diagonal, added to it: H of a few inputs is singular


def rounding_dtype(device: torch.device) -> torch.dtype:
    """float64 on a CPU, where a nearly singular H's factor needs the digits; float32 elsewhere (MPS has no float64).
    H itself is summed in float32 (importance.py): its terms are float32 products, so float64 sums added nothing."""
    return torch.float64 if device.type == "cpu" else torch.float32


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with U^T U = (H + damping)^-1; columns no input ever excited get H_cc = 1 (any value works).

    With J the reversal of rows and columns, J H J = L L^T gives U = J L^-1 J: upper triangular, positive diagonal,
    U^T U = J L^-T L^-1 J = (J (J H J) J)^-1 = H^-1, so it is the Cholesky factor OPTQ's recipe (Cholesky of H,
    its inverse, Cholesky again) computes, in one factorisation and one triangular inverse: about half the work,
    which dominated the paper-scale sweep's rounding (7 s of 11 s for a 3840-column layer)."""
    h = h.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMPING * float(torch.diagonal(h).mean()))
    for scale in (1, 10, 100):
        try:
            lower = torch.linalg.cholesky(torch.flip(h, (0, 1)))
            eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
            return torch.flip(torch.linalg.solve_triangular(lower, eye, upper=False), (0, 1))
        except RuntimeError:  # not positive definite in floating point: damp more
            h.diagonal().add_(DAMPING * scale * float(torch.diagonal(h).mean()))
    raise RuntimeError("the layer's input second-moment matrix is not positive definite even after damping")


def _nearest(w: torch.Tensor, sorted_luts: torch.Tensor, order: torch.Tensor, mids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into the original LUT, values) of each row's nearest entry; a value midway goes to the larger one."""
    pos = torch.searchsorted(mids, w[:, None].contiguous(), right=True)[:, 0]
    return order.gather(1, pos[:, None])[:, 0], sorted_luts.gather(1, pos[:, None])[:, 0]


@torch.no_grad()
def output_aware_indices(weight: torch.Tensor, hessian: torch.Tensor | None, row_luts: torch.Tensor,
                         factor: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (rows, columns) into each row's LUT (rows, k) for `weight` (rows, columns), minimising the layer's
    output error under `hessian` (columns, columns). `factor`: inverse_cholesky_upper(hessian), when the caller
    has it (one H serves every bit-width of a layer, and every layer reading the same input; `hessian` may then be
    None). Runs on the tensors' device."""
    dtype = factor.dtype if factor is not None else rounding_dtype(hessian.device)
    w = weight.to(dtype).clone()
    luts = row_luts.to(dtype)
    sorted_luts, order = torch.sort(luts, dim=1, stable=True)
    mids = (sorted_luts[:, :-1] + sorted_luts[:, 1:]) / 2
    u = inverse_cholesky_upper(hessian.to(dtype)) if factor is None else factor
    rows, columns = w.shape
    indices = torch.empty((rows, columns), dtype=torch.long, device=w.device)
    for b0 in range(0, columns, BLOCK):
        b1 = min(b0 + BLOCK, columns)
        block = w[:, b0:b1].clone()
        errors = torch.empty_like(block)
        for j in range(b1 - b0):
            c = b0 + j
            idx, q = _nearest(block[:, j], sorted_luts, order, mids)
            indices[:, c] = idx
            e = (block[:, j] - q) / u[c, c]
            block[:, j + 1:] -= e[:, None] * u[c, c + 1:b1][None, :]  # the block's later columns absorb the error
            errors[:, j] = e
        w[:, b1:] -= errors @ u[b0:b1, b1:]  # then every column after the block, in one product
    return indices

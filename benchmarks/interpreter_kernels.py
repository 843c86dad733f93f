"""The MIL interpreter's heavy ops now (torch kernels for convolutions and einsum, numpy's BLAS for matrix products)
against the numpy implementations they replaced, side by side in one run on the same inputs: time of each (median of
repeats) and the largest difference of their results.

Shapes are those of the paper-scale model at 1024² (latent 128x128, tokens 64x64), width 0.375 (hidden 720):
the stage downsample (2x2 stride-2 conv, 720 -> 720), the KV compression (depthwise 2x2 stride 2), a 1x1 conv of the
FFN (720 -> 2880), and one head's split-einsum attention pair.

    python benchmarks/interpreter_kernels.py [--output benchmarks/results] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import write_result

from edgecompile.coreml.interpreter import OPS


# ---- the numpy implementations the interpreter used before (the baseline) ----------------------------------------
def numpy_conv(x, weight, strides=(1, 1), groups=1):
    cout, cin_g, kh, kw = weight.shape
    sh, sw = strides
    n, cin, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    if kh == kw == 1 and groups == 1:
        xs = x[:, :, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw]
        return np.einsum("nchw,oc->nohw", xs, weight[:, :, 0, 0], optimize=True)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
    win = win.reshape(n, groups, cin // groups, oh, ow, kh, kw)
    wg = weight.reshape(groups, cout // groups, cin_g, kh, kw)
    return np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True).reshape(n, cout, oh, ow)


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x, w_down, w_dw, w_ffn = f32(1, 720, 64, 64), f32(720, 720, 2, 2) * 0.02, f32(720, 1, 2, 2), f32(2880, 720, 1, 1) * 0.02
    q, k = f32(1, 90, 1, 4096), f32(1, 1024, 1, 90)
    cases = {  # (the numpy baseline, the interpreter's op now), on the same inputs
        "downsample conv 2x2 stride 2, 720 -> 720, 64x64": (lambda: numpy_conv(x, w_down, (2, 2)),
                                                            lambda: OPS["conv"](x, w_down, strides=(2, 2))),
        "depthwise conv 2x2 stride 2, 720 groups, 64x64": (lambda: numpy_conv(x, w_dw, (2, 2), groups=720),
                                                           lambda: OPS["conv"](x, w_dw, strides=(2, 2), groups=720)),
        "1x1 conv 720 -> 2880, 64x64": (lambda: numpy_conv(x, w_ffn), lambda: OPS["conv"](x, w_ffn)),
        "attention scores einsum, one head (d 90), 4096 x 1024 keys": (
            lambda: np.einsum("bchq,bkhc->bkhq", q, k, optimize=True), lambda: OPS["einsum"]([q, k], "bchq,bkhc->bkhq")),
    }
    rows = []
    for name, (old, new) in cases.items():
        t_old, out_old = timed(old, args.repeats)
        t_new, out_new = timed(new, args.repeats)
        diff = float(np.abs(out_old - out_new).max())
        scale = float(np.abs(out_old).max())
        rows.append({"op": name, "before_ms": round(t_old * 1e3, 2), "now_ms": round(t_new * 1e3, 2),
                     "speedup": round(t_old / t_new, 1), "max_abs_difference": diff, "relative_difference": diff / scale})
        print(f"{name}: before {t_old * 1e3:,.1f} ms, now {t_new * 1e3:,.1f} ms: {t_old / t_new:,.1f}x; max |difference| "
              f"{diff:.2e} ({diff / scale:.1e} of the largest value)", flush=True)
    write_result("interpreter_kernels", {"torch_threads": torch.get_num_threads(), "repeats": args.repeats, "ops": rows}, args.output)


if __name__ == "__main__":
    main()

"""The denoiser as a Core AI asset: fp16 compute where Apple's runtime holds the fp16 asset to the bar, fp32 where
not. Apart from convert.py, because it runs what it converts (runtime.py reads convert.py's helpers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgecompile.compress.kmeans import Palette
from edgecompile.coreai.convert import DENOISER_FP16, convert_to_aimodel, float16_compute
from edgecompile.coreai.runtime import AIModelRunner
from edgecompile.deploy.metadata import COMPUTE
from edgecompile.metrics import psnr_db


def convert_denoiser(graph: nn.Module, example: tuple, input_names: list[str], output_names: list[str], path: Path,
                     metadata: dict[str, str], palettes: dict[str, Palette] | None, entrypoints: list[tuple[str, nn.Module, tuple]] | None,
                     checks: dict[str, list[tuple]], min_psnr_db: float) -> str:
    """The denoiser asset in fp16 compute (the fp32 timestep island kept), as Core ML's; where the fp16 asset, run
    by Core AI's runtime on `checks` (function -> package inputs), is not finite or misses `min_psnr_db` against
    the same graph in torch's fp16, it is converted again in fp32 compute, which its metadata then says (as a
    pipeline component falls back; two fp16 implementations of the bundled widths agree to 61.7-67.3 dB,
    benchmarks/coreai_target.py, so a model whose fp16 numerics are rougher must not fail on rounding alone)."""
    version = convert_to_aimodel(graph, example, input_names, output_names, path, {**metadata, COMPUTE: "float16"}, palettes,
                                 entrypoints, fp16=DENOISER_FP16)
    if fp16_asset_holds(path, entrypoints or [("main", graph, example)], input_names, output_names, checks, min_psnr_db):
        return version
    shutil.rmtree(path)
    return convert_to_aimodel(graph, example, input_names, output_names, path, {**metadata, COMPUTE: "float32"}, palettes, entrypoints)


def fp16_asset_holds(path: Path, functions: list[tuple[str, nn.Module, tuple]], input_names: list[str], output_names: list[str],
                     checks: dict[str, list[tuple]], min_psnr_db: float) -> bool:
    """Every function of the fp16 asset `path`, run by Core AI's runtime on its check inputs: finite, and within
    `min_psnr_db` of its graph computed in torch's fp16."""
    for name, graph, _ in functions:
        reference = float16_compute(graph, input_names, DENOISER_FP16.fp32_inputs, DENOISER_FP16.fp32_buffers)
        runner = AIModelRunner(path, name if len(functions) > 1 else "main")
        try:
            for args in checks[name]:
                got = runner({n: a.numpy() for n, a in zip(input_names, args)})
                with torch.no_grad():
                    want = reference(*args)
                want = want if isinstance(want, tuple) else (want,)
                for n, w in zip(output_names, want):
                    out = np.asarray(got[n], np.float32)
                    if not np.isfinite(out).all() or not psnr_db(w.numpy(), out) >= min_psnr_db:
                        return False
        finally:
            runner.close()
    return True

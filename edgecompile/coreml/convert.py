"""DeployDiT -> .mlpackage (coremltools trace conversion), with the I/O contract and metadata users rely on.

I/O names follow apple/ml-stable-diffusion's SD3 denoiser (MultiModalDiffusionTransformer) where the meaning
matches, so Swift pipelines can bind them: all Float32 at the boundary (Swift feeds Float32 MLMultiArrays).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgecompile import __version__
from edgecompile.atomic import interrupts_deferred
from edgecompile.deploy.dit import DeployDiT

LATENT = "latent_image_embeddings"  # (B, C, H, W)
TIMESTEP = "timestep"  # (B,), t in [0, 1]: 1 = pure noise (rectified flow)
TEXT = "token_level_text_embeddings"  # (B, text_dim, 1, T)
OUTPUT = "denoiser_output"  # (B, C, H, W): velocity v = eps - x0
TARGETS = ("iOS17", "iOS18")

IO_DOC = {
    LATENT: "noisy latent x_t, (B, C, H, W) float32",
    TIMESTEP: "flow time t in [0, 1] (1 = noise), (B,) float32",
    TEXT: "text token embeddings in channel-first layout, (B, text_dim, 1, T) float32",
    OUTPUT: "predicted velocity v = noise - x0, (B, C, H, W) float32; Euler step x <- x + (t_next - t) * v",
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_hash(config_dict: dict) -> str:
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()


def example_inputs(deploy: DeployDiT, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic inputs of the package's shapes (used for tracing and for verification)."""
    c = deploy.config
    g = torch.Generator().manual_seed(seed)
    h, w = deploy.latent_hw
    latent = torch.randn((batch, c.latent_channels, h, w), generator=g)
    t = torch.rand((batch,), generator=g) * 0.9 + 0.05
    text = torch.randn((batch, c.text_dim, 1, c.text_len), generator=g)
    return latent, t, text


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools prints version warnings and progress bars on import and conversion; keep our output clean."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        yield


def import_coremltools():
    """coremltools, imported quietly and with Ctrl-C/SIGTERM held back: its optional imports' bare `except:`
    would swallow the KeyboardInterrupt and the command would carry on. A signal is acted on after the import."""
    with interrupts_deferred(), quiet_coremltools():
        import coremltools as ct
    return ct


@dataclass
class PackageInfo:
    width: float
    params: int
    config: dict
    checkpoint_sha256: str | None
    bits: str = "16"
    description: str = ""


def convert_to_mlmodel(deploy: DeployDiT, target: str = "iOS17", compute_precision: str = "float16", palettes: dict | None = None,
                       fp32_timestep_island: bool = True):
    """Trace and convert; returns an in-memory ct.models.MLModel (mlprogram).

    `palettes` (layer -> Palette) are then written in with coremltools' palettize_weights (edgecompile's own LUTs).
    `fp32_timestep_island=False` is the naive fp16 conversion, kept only to measure what the island buys."""
    ct = import_coremltools()
    if target not in TARGETS:
        from edgecompile.errors import EdgeCompileError

        raise EdgeCompileError(f"--target {target} is not supported: use one of {', '.join(TARGETS)}")
    example = example_inputs(deploy)
    with torch.no_grad():
        traced = torch.jit.trace(deploy.eval(), example, check_trace=False)
    if compute_precision == "float16":
        precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: not (fp32_timestep_island and timestep_feature_op(op)))
    else:
        precision = ct.precision.FLOAT32
    with quiet_coremltools():
        ml = ct.convert(
            traced,
            inputs=[
                ct.TensorType(name=LATENT, shape=tuple(example[0].shape), dtype=np.float32),
                ct.TensorType(name=TIMESTEP, shape=tuple(example[1].shape), dtype=np.float32),
                ct.TensorType(name=TEXT, shape=tuple(example[2].shape), dtype=np.float32),
            ],
            outputs=[ct.TensorType(name=OUTPUT, dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=precision,
        )
    if palettes:
        from edgecompile.compress.palettize_model import check_palettized, palettization_config

        with quiet_coremltools():
            ml = ct.optimize.coreml.palettize_weights(ml, palettization_config(ct, palettes))
        check_palettized(ml, palettes)
    return ml


def timestep_feature_op(op) -> bool:
    """True for ops computed from the timestep input alone, before any weight layer (reshape, x freqs, cos, sin).

    They stay fp32: t * 1000 * f reaches 1000 rad, where fp16's spacing is 0.5 rad, so fp16 sinusoidal
    features of the timestep would be wrong (benchmarks/fp16_island.py: 39.9 dB at t = 0.85 without this on a random
    GQA config, 69.0 dB with it, under the fp16 emulation that follows the package's dtypes).
    The few ops involved run on (B, 256) tensors; everything from the first conv on is fp16.
    """
    if op.op_type in ("conv", "linear", "matmul", "const"):
        return False
    seen_timestep = False
    for v in op.inputs.values():
        for var in v if isinstance(v, (list, tuple)) else [v]:
            producer = var.op
            if producer is None:
                if var.name != TIMESTEP:
                    return False
                seen_timestep = True
            elif producer.op_type == "const":
                continue
            elif timestep_feature_op(producer):
                seen_timestep = True
            else:
                return False
    return seen_timestep


def package_metadata(info: PackageInfo, deploy: DeployDiT) -> dict[str, str]:
    """The edgecompile keys every exported model carries (Core ML user metadata, ONNX metadata_props)."""
    h, w = deploy.latent_hw
    return {
        "edgecompile.version": __version__,
        "edgecompile.width": repr(float(info.width)),
        "edgecompile.params": str(info.params),
        "edgecompile.bits": info.bits,
        "edgecompile.latent": f"{h}x{w}",
        "edgecompile.config": json.dumps(info.config, sort_keys=True),
        "edgecompile.config_sha256": config_hash(info.config),
        "edgecompile.checkpoint_sha256": info.checkpoint_sha256 or "none",
        "edgecompile.io": json.dumps(IO_DOC),
    }


def set_metadata(ml, info: PackageInfo, deploy: DeployDiT, extra: dict | None = None) -> None:
    ct = import_coremltools()
    c = deploy.config
    h, w = deploy.latent_hw
    ml.author = "edgecompile"
    ml.license = "Same license as the source checkpoint"
    ml.version = __version__
    ml.short_description = info.description or (
        f"SnapGen++-style efficient DiT denoiser '{c.name}', width {info.width:g}, {info.params / 1e6:.2f} M parameters, "
        f"latent {h}x{w}, {info.bits}-bit weights. One rectified-flow velocity prediction per call."
    )
    for name, doc in IO_DOC.items():
        if name in ml.input_description or name == OUTPUT:
            (ml.output_description if name == OUTPUT else ml.input_description)[name] = doc
    meta = {
        "com.github.apple.coremltools.source": "edgecompile",  # Apple's converter-name key convention
        "coremltools.version": ct.__version__,
        **package_metadata(info, deploy),
    }
    meta.update(extra or {})
    ml.user_defined_metadata.update(meta)

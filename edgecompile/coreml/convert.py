"""DeployDiT -> .mlpackage (coremltools trace conversion), with the I/O contract and metadata users rely on.

I/O names follow apple/ml-stable-diffusion's SD3 denoiser (MultiModalDiffusionTransformer) where the meaning
matches, so Swift pipelines can bind them: all Float32 at the boundary (Swift feeds Float32 MLMultiArrays).
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import torch

from edgecompile import __version__
from edgecompile.choices import Target
from edgecompile.coreml.palettize import PALETTIZE_PASS, check_palettized, palettization_config
from edgecompile.coremltools_loader import import_coremltools, quiet_coremltools
from edgecompile.deploy.contract import OUTPUT, TIMESTEP, example_inputs, input_names, io_doc
from edgecompile.deploy.metadata import PackageMetadata
from edgecompile.deploy.chunks import ChunkIO, DeployChunk, carried_doc, chunk_example
from edgecompile.deploy.dit import DeployDiT



def convert_to_mlmodel(deploy: DeployDiT, target: str = "iOS17", compute_precision: str = "float16", palettes: dict | None = None,
                       fp32_timestep_island: bool = True):
    """Trace and convert; returns an in-memory ct.models.MLModel (mlprogram).

    `palettes` (layer -> Palette), edgecompile's own LUTs, are emitted during conversion: coremltools' palettize
    pass runs once, last in the conversion pipeline, on the fp16 weight consts. (Running palettize_weights on the
    finished model instead reloads the program and runs the whole pipeline a second time; benchmarks/export_scale.py
    measures both.)
    `fp32_timestep_island=False` is the naive fp16 conversion, kept only to measure what the island buys."""
    return convert_graph(deploy, example_inputs(deploy), input_names(deploy.config), [OUTPUT], target, compute_precision,
                         palettes, fp32_timestep_island)


def convert_chunks(chunks: list[DeployChunk], io: list[ChunkIO], example: tuple, target: str = "iOS17",
                   palettes: dict | None = None):
    """Each chunk of `deploy/chunks.py` as its own program, with the palettes of the layers it holds; yields the
    in-memory models one at a time (a caller saves each before the next is built)."""
    for chunk, names, args in zip(chunks, io, chunk_example(chunks, io, example)):
        own = {layer: p for layer, p in (palettes or {}).items() if chunk.owns(layer)}
        yield convert_graph(chunk, args, names.inputs, names.outputs, target, palettes=own)


def convert_graph(graph: torch.nn.Module, example: tuple, input_names: list[str], output_names: list[str], target: str = "iOS17",
                  compute_precision: str = "float16", palettes: dict | None = None, fp32_timestep_island: bool = True):
    ct = import_coremltools()
    target = Target.parse(target, "--target").value
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # static shapes are the contract: shape checks become constants
        traced = torch.jit.trace(graph.eval(), example, check_trace=False)
    if compute_precision == "float16":
        precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: not (fp32_timestep_island and timestep_feature_op(op)))
    else:
        precision = ct.precision.FLOAT32
    pipeline = ct.PassPipeline.DEFAULT
    if palettes:
        pipeline.append_pass(PALETTIZE_PASS)
        pipeline.set_options(PALETTIZE_PASS, {"config": palettization_config(ct, palettes)})
    with quiet_coremltools():
        ml = ct.convert(
            traced,
            inputs=[ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32) for n, x in zip(input_names, example)],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in output_names],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=precision,
            pass_pipeline=pipeline,
        )
    if palettes:
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


def set_metadata(ml, meta: PackageMetadata, deploy: DeployDiT) -> None:
    ct = import_coremltools()
    c = deploy.config
    h, w = deploy.latent_hw
    ml.author = "edgecompile"
    ml.license = "Same license as the source checkpoint"
    ml.version = __version__
    per_call = "DDPM noise (epsilon) prediction" if c.prediction == "epsilon" else "rectified-flow velocity prediction"
    ml.short_description = (
        f"DiT denoiser '{c.name}' (edgecompile), width {meta.width:g}, {meta.params / 1e6:.2f} M parameters, "
        f"latent {h}x{w}, {meta.bits}-bit weights. One {per_call} per call."
    )
    spec = ml.get_spec().description
    for features, descriptions in ((spec.input, ml.input_description), (spec.output, ml.output_description)):
        for f in features:
            descriptions[f.name] = io_doc(c).get(f.name) or carried_doc(f.name)
    ml.user_defined_metadata.update({
        "com.github.apple.coremltools.source": "edgecompile",  # Apple's converter-name key convention
        "coremltools.version": ct.__version__,
        **meta.to_strings(),
    })


def combine_functions(parts: list[tuple[str, str]], dest: str, meta: PackageMetadata) -> None:
    """One multifunction package (iOS18) from one-function packages [(function name, package path)], the first
    the default function; constants byte-identical across them (every weight: the functions differ in latent size
    only) are stored once by coremltools' save_multifunction. It drops the package description, so the first
    part's (author, license, version, description, user metadata) is restored, then `meta` (which names the
    functions) written over it."""
    ct = import_coremltools()
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in parts:
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = parts[0][0]
    combined = f"{dest}.combined.mlpackage"
    with quiet_coremltools():
        ct.utils.save_multifunction(desc, combined)
    ml = ct.models.MLModel(combined, skip_model_load=True)
    first = ct.models.MLModel(str(parts[0][1]), skip_model_load=True)
    ml.author, ml.license, ml.version, ml.short_description = first.author, first.license, first.version, first.short_description
    ml.user_defined_metadata.update({**dict(first.user_defined_metadata), **meta.to_strings()})
    ml.save(str(dest))
    del ml
    shutil.rmtree(combined)

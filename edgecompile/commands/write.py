"""Writing a width's packages: one entry point, `write_package`, over the layouts and the formats.

    layout          files                                         made by
    single          one package                                   write_single  (Core ML, ONNX or Core AI: FORMAT_WRITERS)
    chunked         --chunks N: N packages run one after another   write_chunked (deploy/chunks.py)
    multifunction   --latent A,B,...: one package, a function      write_multifunction (Core ML iOS18; Core AI:
                    per latent size, weights stored once          one asset, an entrypoint per size)

A new layout is one more function here and one more `Layout` member; a new format (target runtime) one more
entry of FORMAT_WRITERS. Every package gets its metadata record (deploy/metadata.py) from the same base.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import torch

from edgecompile.atomic import safe_name
from edgecompile.choices import Bits, Format, Target
from edgecompile.coreml.convert import combine_functions, convert_chunks, convert_to_mlmodel, set_metadata
from edgecompile.coreml.verify import DEFAULT_MIN_PSNR_DB, verification_inputs
from edgecompile.coreml.package import ONNX_INITIALIZERS, function_name, onnx_weights_digest, record_weight_digests, weight_file_bytes
from edgecompile.coremltools_loader import import_coremltools
from edgecompile.deploy.chunks import chunk_example, split_deploy
from edgecompile.deploy.contract import OUTPUT, TEXT_MASK, example_inputs, input_names
from edgecompile.deploy.dit import DeployDiT
from edgecompile.deploy.metadata import PackageMetadata
from edgecompile.deploy.onnx_export import export_onnx
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.export_report import ChunkReport
from edgecompile.model.config import width_label

SWIFT_DENOISER = "MultiModalDiffusionTransformer"  # ml-stable-diffusion's SD3 denoiser resource name


class Layout(str, Enum):
    SINGLE = "single"
    CHUNKED = "chunked"
    MULTIFUNCTION = "multifunction"


def package_name(config_name: str, width: float, bits: Bits | str, fmt: Format | str) -> str:
    """The package's file name. The model name comes from data, so it is made a safe name, never a path.
    ONNX exports hold fp32 weights and are named so."""
    fmt = Format(fmt)
    tag = "fp32" if fmt is Format.ONNX else Bits(bits).tag
    return f"{safe_name(config_name)}_w{width_label(width)}_{tag}{fmt.suffix}"


def chunk_package_names(name: str, n: int, swift: bool) -> list[str]:
    """--chunks N: the package files in run order, named as apple/ml-stable-diffusion names its U-Net chunks
    (UnetChunk1.mlpackage, ...): `<denoiser>Chunk<k>` in Swift resources, `<stem>_chunk<k>` otherwise; the
    package's own suffix (.mlpackage, .aimodel)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    return [f"{stem}{'Chunk' if swift else '_chunk'}{k}{suffix}" for k in range(1, n + 1)]


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass(frozen=True)
class PackageSpec:
    """What to write for one width: where, in which format and layout, with which metadata and palettes."""

    folder: Path  # the folder the package files go in (a staging folder)
    name: str  # the package's file name (chunks derive theirs from it)
    fmt: Format
    target: Target
    meta: PackageMetadata  # the base record; each file gets its own latent, chunk and function fields
    palettes: dict | None = None  # layer -> Palette (edgecompile's own LUTs), for palettized packages
    chunks: int = 1
    more_latents: tuple[tuple[int, int], ...] = ()
    query_chunk: int | None = None
    swift: bool = False

    @property
    def layout(self) -> Layout:
        if self.chunks > 1:
            return Layout.CHUNKED
        return Layout.MULTIFUNCTION if self.more_latents else Layout.SINGLE


@dataclass
class WrittenPackage:
    """The files written for one width and the graphs they hold."""

    paths: list[Path]  # in run order; the first takes the package inputs
    graphs: list[tuple[str | None, DeployDiT]]  # (function, graph): None for a one-function package
    converter: str | None = None  # coremltools' version, for Core ML packages
    chunks: list[ChunkReport] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def size_bytes(self) -> int:
        return sum(size_on_disk(p) for p in self.paths)

    def largest_weight_file(self) -> int:
        return max(weight_file_bytes(p) for p in self.paths) if self.path.suffix == ".mlpackage" else 0


def write_coreml(graph: DeployDiT, path: Path, spec: PackageSpec, meta: PackageMetadata) -> str:
    ct = import_coremltools()
    ml = convert_to_mlmodel(graph, target=spec.target, palettes=spec.palettes)
    set_metadata(ml, meta, graph)
    ml.save(str(path))
    del ml  # its temporary package lives in the staging folder: let coremltools drop it now
    return ct.__version__


def write_onnx(graph: DeployDiT, path: Path, spec: PackageSpec, meta: PackageMetadata) -> None:
    export_onnx(graph, path, metadata=meta.to_strings(), weights_digest=lambda w: {ONNX_INITIALIZERS: onnx_weights_digest(w)})
    return None


def write_aimodel(graph: DeployDiT, path: Path, spec: PackageSpec, meta: PackageMetadata,
                  entrypoints: list[tuple[str, DeployDiT]] | None = None) -> str:
    from edgecompile.coreai.denoiser import convert_denoiser

    names = input_names(graph.config)
    functions = [(name, g, example_inputs(g)) for name, g in entrypoints] if entrypoints else None

    def checks_for(g: DeployDiT) -> list[tuple]:  # the verification's random inputs (a text mask attends to every token)
        extra = (torch.ones(1, g.config.text_len),) if TEXT_MASK in names else ()
        return [(*inputs, *extra) for inputs in verification_inputs(g.config, tuple(g.latent_hw))]

    checks = {name: checks_for(g) for name, g, _ in functions} if functions else {"main": checks_for(graph)}
    return convert_denoiser(graph, example_inputs(graph), names, [OUTPUT], path, meta.to_strings(), spec.palettes, functions, checks,
                            DEFAULT_MIN_PSNR_DB)


# a target runtime's format: (graph, path, spec, metadata) -> the converter's version (or None)
FORMAT_WRITERS = {Format.COREML: write_coreml, Format.ONNX: write_onnx, Format.AIMODEL: write_aimodel}
# the precision each format's program computes in (recorded in its metadata; verification follows it): Core ML's
# FP16ComputePrecision and Core AI's float16_compute keep the timestep's features in fp32; ONNX exports are fp32 graphs
FORMAT_COMPUTE = {Format.COREML: "float16", Format.ONNX: "float32", Format.AIMODEL: "float16"}


def write_single(deploy: DeployDiT, dense, spec: PackageSpec) -> WrittenPackage:
    path = spec.folder / spec.name
    version = FORMAT_WRITERS[spec.fmt](deploy, path, spec, spec.meta.with_(latent_hw=tuple(deploy.latent_hw)))
    return WrittenPackage(paths=[path], graphs=[(None, deploy)], converter=version)


def write_chunked(deploy: DeployDiT, dense, spec: PackageSpec) -> WrittenPackage:
    """--chunks N: each chunk converted and saved in turn, with the metadata that binds it to the others."""
    paths = [spec.folder / n for n in chunk_package_names(spec.name, spec.chunks, spec.swift)]
    example = example_inputs(deploy)
    base = spec.meta.with_(latent_hw=tuple(deploy.latent_hw), chunk_packages=tuple(p.name for p in paths))
    if spec.fmt is Format.AIMODEL:
        return write_aimodel_chunks(deploy, paths, example, base, spec)
    chunks, io = split_deploy(deploy, len(paths), example)
    reports = []
    ct = import_coremltools()
    models = convert_chunks(chunks, io, example, target=spec.target, palettes=spec.palettes)
    for chunk, names, path, ml in zip(chunks, io, paths, models):
        set_metadata(ml, base.with_(chunk=(chunk.index, chunk.count)), deploy)
        ml.save(str(path))
        del ml
        reports.append(chunk_report(chunk, names, path))
    return WrittenPackage(paths=paths, graphs=[(None, deploy)], converter=ct.__version__, chunks=reports)


def write_aimodel_chunks(deploy: DeployDiT, paths: list[Path], example: tuple, base: PackageMetadata, spec: PackageSpec) -> WrittenPackage:
    """Core AI chunks: the deploy graph with its LUTs, in fp16 but for the timestep island, split where Core ML's
    chunks are (the same carried names), each chunk converted with Float32 at its boundary."""
    from edgecompile.coreai.convert import DENOISER_FP16, Float16Boundary, convert_to_aimodel, fp16_graph, fp16_inputs, with_luts

    graph = with_luts(deploy, spec.palettes)
    graph = fp16_graph(graph, DENOISER_FP16.fp32_buffers, in_place=graph is not deploy)
    inside = fp16_inputs(example, input_names(deploy.config), DENOISER_FP16)
    chunks, io = split_deploy(graph, len(paths), inside)
    reports, version = [], None
    for chunk, names, path, args in zip(chunks, io, paths, chunk_example(chunks, io, inside)):
        boundary = tuple(a.float() if a.is_floating_point() else a for a in args)  # the Float32 an app feeds
        version = convert_to_aimodel(Float16Boundary(chunk, names.inputs, DENOISER_FP16.fp32_inputs), boundary, names.inputs, names.outputs,
                                     path, base.with_(chunk=(chunk.index, chunk.count)).to_strings())
        reports.append(chunk_report(chunk, names, path))
    return WrittenPackage(paths=paths, graphs=[(None, deploy)], converter=version, chunks=reports)


def chunk_report(chunk, names, path: Path) -> ChunkReport:
    return ChunkReport(package=path.name, blocks=[chunk.start, chunk.end], inputs={n: names.shapes[n] for n in names.inputs},
                       outputs={n: names.shapes[n] for n in names.outputs}, size_bytes=size_on_disk(path),
                       weight_file_bytes=weight_file_bytes(path) if path.suffix == ".mlpackage" else size_on_disk(path))


def function_graphs(dense, deploy: DeployDiT, more_latents, query_chunk: int | None) -> list[tuple[str, DeployDiT]]:
    """(function name, deploy graph) per latent size of a multifunction export, the default (--latent's first)
    first. Every graph holds the very parameters of `deploy` (palettized and distilled ones included): the sizes
    differ only in their constants (position table, micro-conditions)."""
    graphs = [(function_name(deploy.latent_hw), deploy)]
    for hw in more_latents:
        other = deploy_model(dense, latent_hw=tuple(hw), query_chunk=query_chunk)
        other.load_state_dict(deploy.state_dict(keep_vars=True), assign=True)  # shared, not copied
        graphs.append((function_name(tuple(hw)), other))
    return graphs


def write_multifunction(deploy: DeployDiT, dense, spec: PackageSpec) -> WrittenPackage:
    """Each latent size converted on its own, then combined into one multifunction package."""
    path = spec.folder / spec.name
    graphs = function_graphs(dense, deploy, spec.more_latents, spec.query_chunk)
    functions = {name: "{}x{}".format(*graph.latent_hw) for name, graph in graphs}
    if spec.fmt is Format.AIMODEL:  # one Core AI program with an entrypoint per size
        version = write_aimodel(deploy, path, spec, spec.meta.with_(latent_hw=tuple(deploy.latent_hw), functions=functions), graphs)
        return WrittenPackage(paths=[path], graphs=graphs, converter=version)
    with tempfile.TemporaryDirectory(prefix="functions-") as scratch:  # inside the staging folder (scratch_tempdir)
        parts = []
        for function, graph in graphs:
            part = Path(scratch) / f"{function}.mlpackage"
            version = write_coreml(graph, part, spec, spec.meta.with_(latent_hw=tuple(graph.latent_hw)))
            parts.append((function, str(part)))
        combine_functions(parts, str(path), spec.meta.with_(latent_hw=tuple(deploy.latent_hw), functions=functions))
    return WrittenPackage(paths=[path], graphs=graphs, converter=version)


LAYOUT_WRITERS = {Layout.SINGLE: write_single, Layout.CHUNKED: write_chunked, Layout.MULTIFUNCTION: write_multifunction}


def write_package(deploy: DeployDiT, dense, spec: PackageSpec) -> WrittenPackage:
    """The package files of `deploy` (converted from the width's dense model `dense`) as `spec` says."""
    spec.folder.mkdir(exist_ok=True)
    spec = replace(spec, meta=spec.meta.with_(compute=FORMAT_COMPUTE[spec.fmt]))
    written = LAYOUT_WRITERS[spec.layout](deploy, dense, spec)
    for path in written.paths:
        if path.suffix == ".mlpackage":  # an ONNX file records its digest as it is written
            record_weight_digests(path)
    for chunk, path in zip(written.chunks, written.paths):
        chunk.size_bytes = size_on_disk(path)  # with the digests now in its model.mlmodel
    return written

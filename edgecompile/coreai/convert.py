"""A deploy graph -> an `.aimodel` asset, through coreai-torch (torch.export -> Core AI program -> asset).

The graph is the very one the Core ML writer converts (deploy/dit.py, the text encoder and decoder graphs), so
both targets share the I/O contract's names, the layout rewrites and the compression. What differs:
- palettized layers carry edgecompile's LUTs and indices as `coreai::lut_to_dense(indices, lut, axis)`, which
  coreai-torch lowers to a LUT constant (indices narrowed to uint<nbits>): the same LUT values, bit for bit, as in
  the Core ML package and palettes.safetensors (`LutConv` below, checked by the tests);
- coreai-torch takes an ExportedProgram decomposed with its own table (it refuses aten.conv2d and the like
  undecomposed); an op it cannot lower is a one-line error naming the op and the layer it came from;
- the asset's metadata.json holds edgecompile's record as custom entries, and the SHA-256 of its program file.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecompile.compress.kmeans import Palette
from edgecompile.deploy.contract import TIMESTEP
from edgecompile.digest import sha256_file
from edgecompile.errors import EdgeCompileError

PROGRAM_FILES = ("main.mlirb",)  # the asset's program (ops and weights): what the recorded digest covers


@contextlib.contextmanager
def quiet_coreai():
    """Keep the converter's and the runtime's own lines ("converting 1 program(s)", "Loading function 'main'") out of
    our output, --json's included: Python-level prints and the native library's writes to fds 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def import_coreai():
    """(coreai_torch, coreai.authoring.asset) or the one-line error saying how to install them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "validated with torch <= 2.13.0", said of 2.13.0 itself
            import coreai_torch
            import coreai_torch._compression.custom_layers  # noqa: F401  registers coreai::lut_to_dense
            from coreai.authoring import asset
    except ImportError as e:
        raise EdgeCompileError(f"--format aimodel needs Apple's coreai-torch and coreai-core ({e.name} is not installed): "
                               "pip install 'edgecompile[coreai]'") from None
    return coreai_torch, asset


class LutConv(nn.Module):
    """A palettized convolution: its weight is `coreai::lut_to_dense(indices, lut)`, which the converter keeps as a
    LUT constant rather than a dense one. lut (G, 2^n) fp16 per group of output channels (axis 0) -> the op's
    (G, 1, 1, 1, 2^n, 1) layout: rank = the indices' rank + 2, each leading dimension dividing the weight's."""

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d, palette: Palette):
        super().__init__()
        self.transpose = isinstance(conv, nn.ConvTranspose2d)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.output_padding = getattr(conv, "output_padding", 0)
        indices = torch.from_numpy(palette.indices.astype("uint8"))
        if tuple(indices.shape) != tuple(conv.weight.shape):
            raise EdgeCompileError(f"internal: a palette of shape {tuple(indices.shape)} for a weight of shape {tuple(conv.weight.shape)}")
        lut = torch.from_numpy(palette.lut.astype("float16"))
        self.register_buffer("indices", indices)
        self.register_buffer("lut", lut.reshape(lut.shape[0], *([1] * (indices.dim() - 1)), lut.shape[1], 1))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.ops.coreai.lut_to_dense(self.indices, self.lut, 0).to(dtype)  # the fp16 LUT's values, exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight(x.dtype)  # an fp16 graph reads the LUT's values as they are
        if self.transpose:
            return F.conv_transpose2d(x, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@dataclass(frozen=True)
class Float16Plan:
    """What an fp16 program keeps in fp32: inputs by name, and float buffers by their path in the graph."""

    fp32_inputs: tuple[str, ...] = ()
    fp32_buffers: tuple[str, ...] = ()


# The denoiser's fp32 island in Core AI (coreml/convert.py's timestep_feature_op in Core ML): the timestep and the
# frequencies it multiplies (DeployDiT.freqs) stay fp32, so the sinusoidal features do; DeployDiT.embed casts them
# to the compute dtype before t_mlp1
DENOISER_FP16 = Float16Plan(fp32_inputs=(TIMESTEP,), fp32_buffers=("freqs",))


def fp16_graph(graph: nn.Module, fp32_buffers: tuple[str, ...] = (), in_place: bool = False) -> nn.Module:
    """`graph` with its weights and float buffers in fp16 (a copy, or the graph itself when `in_place`: a copy the
    caller made already), but for `fp32_buffers`, which keep their original fp32 values (not fp16-rounded ones)."""
    def owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
        parent, _, leaf = name.rpartition(".")
        return (module.get_submodule(parent) if parent else module), leaf

    kept = {name: getattr(*owner(graph, name)).detach().float().clone() for name in fp32_buffers
            if getattr(*owner(graph, name), None) is not None}
    half = (graph if in_place else copy.deepcopy(graph)).half()
    for name, value in kept.items():
        setattr(*owner(half, name), value)
    return half


class Float16Boundary(nn.Module):
    """The I/O contract's Float32 at the boundary (what Swift feeds) of a graph that computes in fp16: each float
    input cast to fp16 on entry, but those named in `fp32_inputs`, and the outputs cast back to fp32. The graph
    itself is not copied (a chunk of an fp16 deploy graph is wrapped as it is)."""

    def __init__(self, graph: nn.Module, input_names: list[str], fp32_inputs: tuple[str, ...] = ()):
        super().__init__()
        self.model = graph  # not `graph`: torch.export's GraphModule has a .graph of its own
        self.keep = [name in fp32_inputs for name in input_names]

    def forward(self, *inputs: torch.Tensor | None):
        keep = self.keep + [False] * (len(inputs) - len(self.keep))
        args = [x.half() if x is not None and x.is_floating_point() and not k else x for x, k in zip(inputs, keep)]
        out = self.model(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def float16_compute(graph: nn.Module, input_names: list[str], fp32_inputs: tuple[str, ...] = (),
                    fp32_buffers: tuple[str, ...] = (), in_place: bool = False) -> Float16Boundary:
    """fp16 compute inside, Float32 at the boundary: Core AI's program takes its dtypes from the exported graph, so
    this is how an asset computes in fp16 (as Core ML's FP16ComputePrecision does). `fp32_inputs` and
    `fp32_buffers` stay fp32: for the denoiser the timestep and its frequencies, so that the sinusoidal features
    are computed in fp32 (the timestep island: t * 1000 * f reaches 1000 rad, where fp16's spacing is 0.5 rad);
    the graph casts them to fp16 before its first layer."""
    return Float16Boundary(fp16_graph(graph, fp32_buffers, in_place), input_names, fp32_inputs)


def fp16_inputs(inputs: tuple[torch.Tensor, ...], input_names: list[str], plan: Float16Plan) -> tuple[torch.Tensor, ...]:
    """Package inputs as an fp16 graph takes them inside its boundary."""
    return tuple(x.half() if x.is_floating_point() and n not in plan.fp32_inputs else x for x, n in zip(inputs, input_names))


def with_luts(graph: nn.Module, palettes: dict[str, Palette] | None) -> nn.Module:
    """A copy of `graph` whose palettized layers read their LUTs and indices (the caller's graph is untouched: it
    stays the simulation that verification compares against)."""
    if not palettes:
        return graph
    graph = copy.deepcopy(graph)
    for name, palette in palettes.items():
        parent, _, leaf = name.rpartition(".")
        owner = graph.get_submodule(parent) if parent else graph
        setattr(owner, leaf, LutConv(getattr(owner, leaf), palette))
    return graph


_ATEN_OP = re.compile(r"(aten[.:]+[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


def unsupported_op_error(ep, error: Exception) -> EdgeCompileError:
    """The converter's refusal as one line: the op, and the layer of the graph it came from."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    match = _ATEN_OP.search(str(error))
    op = match.group(1).replace("::", ".") if match else None
    layer = None
    if op is not None:
        short = op.split(".")[1]
        for node in ep.graph.nodes:
            if node.op == "call_function" and short in str(node.target):
                stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
                layer = stack[-1] if stack else "the model's own forward"
                break
    where = f" in layer {layer}" if layer else ""
    return EdgeCompileError(f"Core AI cannot convert {op or 'an op'}{where} ({text[:160]}): export this model with --format coreml, "
                            "or report the op")


def exported_program(graph: nn.Module, example: tuple):
    """torch.export of the graph, decomposed with coreai-torch's table (what its converter takes)."""
    coreai_torch, _ = import_coreai()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's deprecation notes about its own pytree specs
        ep = torch.export.export(graph.eval(), tuple(example), strict=False)
        return ep.run_decompositions(coreai_torch.get_decomp_table())


def convert_to_aimodel(graph: nn.Module, example: tuple, input_names: list[str], output_names: list[str], path: Path,
                       metadata: dict[str, str], palettes: dict[str, Palette] | None = None,
                       entrypoints: list[tuple[str, nn.Module, tuple]] | None = None, fp16: Float16Plan | None = None) -> str:
    """Convert and save `graph` as the asset `path` (a staging path: the caller renames it into place). Several
    `entrypoints` (name, graph, example) become functions of one asset (several latent sizes). `fp16`: compute in
    fp16 but for its fp32 island (None: fp32 compute). Returns the converter's version."""
    program = build_program(graph, example, input_names, output_names, palettes, entrypoints, fp16)
    save_program(program, path, metadata)
    import importlib.metadata

    return importlib.metadata.version("coreai-torch")


def save_program(program, path: Path, metadata: dict[str, str]) -> None:
    """The asset on disk, with edgecompile's record (a bare conversion, e.g. the interpreter's oracle, has none)."""
    try:
        with quiet_coreai():
            program.save_asset(Path(path))
    except RuntimeError as e:  # the native writer's errors: a full disk is the OSError the staged outputs map
        if "space" in str(e).lower():
            raise OSError(errno.ENOSPC, f"no space left on device writing {path}") from None
        raise EdgeCompileError(f"Core AI could not save {path} ({str(e).splitlines()[0][:200]})") from None
    if metadata:
        write_metadata(path, metadata)


def build_program(graph: nn.Module, example: tuple, input_names: list[str], output_names: list[str],
                  palettes: dict[str, Palette] | None = None, entrypoints: list[tuple[str, nn.Module, tuple]] | None = None,
                  fp16: Float16Plan | None = None):
    """The in-memory Core AI program of `graph` (or of several entrypoints), LUTs inside; fp16 compute with `fp16`."""
    coreai_torch, _ = import_coreai()
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)  # DEBUG, the default, keeps debug records
    functions = entrypoints or [("main", graph, example)]
    for name, g, args in functions:
        luts = with_luts(g, palettes)  # by the graph's own layer names, before any wrapper
        if fp16 is not None:  # in place on with_luts' copy, where it made one (one copy of a paper-scale graph, not two)
            luts = float16_compute(luts, input_names, fp16.fp32_inputs, fp16.fp32_buffers, in_place=luts is not g)
        g = luts
        ep = exported_program(g, args)
        try:
            with quiet_coreai():
                converter.add_exported_program(ep, input_names=list(input_names), output_names=list(output_names), entrypoint_name=name)
        except (NotImplementedError, KeyError, ValueError, RuntimeError, TypeError, AssertionError) as e:
            raise unsupported_op_error(ep, e) from None
    try:
        with quiet_coreai():
            return converter.to_coreai(entrypoints=[name for name, _, _ in functions])
    except (NotImplementedError, KeyError, ValueError, RuntimeError, TypeError, AssertionError) as e:
        raise EdgeCompileError(f"Core AI could not build the program ({str(e).splitlines()[0][:200]}): export with --format coreml") from None


def program_digests(path: Path) -> dict[str, str]:
    return {name: sha256_file(Path(path) / name) for name in PROGRAM_FILES if (Path(path) / name).is_file()}


def write_metadata(path: Path, strings: dict[str, str]) -> None:
    """edgecompile's record into the asset's metadata.json (custom entries), with its program's SHA-256."""
    from edgecompile.deploy.metadata import WEIGHTS_SHA256
    import json

    _, asset_mod = import_coreai()
    asset = asset_mod.AIModelAsset.load(Path(path))
    entries = {**strings, WEIGHTS_SHA256: json.dumps(program_digests(path), sort_keys=True)}

    def update(m):
        m.author = "edgecompile"
        for key, value in entries.items():
            m.set_custom(key, value)

    asset.update_metadata(update)


class ComponentAsset:
    """A pipeline component converted for Core AI, saved once per width folder (`save`), as a Core ML component's
    in-memory model is: `user_defined_metadata` collects the record written with it."""

    def __init__(self, program):
        self.program = program
        self.user_defined_metadata: dict[str, str] = {}

    def save(self, path: str) -> None:
        save_program(self.program, Path(path), dict(self.user_defined_metadata))


def component_outputs(graph: nn.Module, args: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = graph(*args)
    return list(out) if isinstance(out, tuple) else [out]

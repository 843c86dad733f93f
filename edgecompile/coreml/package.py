"""Reading a saved .mlpackage back (on Linux too): its MIL program with weights, I/O, metadata, op census.
An ONNX export reads into the same view (metadata, I/O, op census, initializer bytes; no MIL program), and so
does a Core AI `.aimodel` asset (its functions' I/O, op census and metadata.json; coreai/runtime.py)."""

from __future__ import annotations

import collections
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompile.choices import Bits, Format
from edgecompile.coremltools_loader import load_mil_program, model_proto
from edgecompile.deploy.contract import LATENT
from edgecompile.deploy.metadata import COMPONENT, WEIGHTS_SHA256, PackageMetadata
from edgecompile.digest import sha256_file
from edgecompile.errors import EdgeCompileError

LAYOUT_OPS = ("transpose", "reshape")
BLOCK_NAME = re.compile(r"^(down|middle|up)_(\d+)_")
# The Neural Engine refuses a package whose weight file exceeds 2 GiB (coremltools issue 2554, PR 2593); Core ML
# then runs it on the GPU or CPU.
ANE_MAX_WEIGHT_FILE_BYTES = 2 * 2**30


def function_name(latent_hw: tuple[int, int]) -> str:
    """The documented name of a multifunction package's function for one latent size (Swift:
    MLModelConfiguration.functionName; Python: MLModel(path, function_name=...))."""
    return f"latent_{latent_hw[0]}x{latent_hw[1]}"


SPEC_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"
WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"
ONNX_INITIALIZERS = "initializers"  # the one entry of an ONNX export's weight digests (its weights live in the file)


def weight_digests(package: Path) -> dict[str, str]:
    """SHA-256 of every weight file of a .mlpackage, by its path inside the package."""
    package = Path(package)
    return {f.relative_to(package).as_posix(): sha256_file(f) for f in sorted((package / WEIGHTS_DIR).rglob("*")) if f.is_file()}


def onnx_weights_digest(weights: dict[str, np.ndarray]) -> str:
    """One SHA-256 over an ONNX export's initializers (names, dtypes, shapes and values, in name order)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = np.ascontiguousarray(weights[name])
        h.update(f"{name}|{w.dtype.str}|{w.shape}|".encode())
        h.update(w.tobytes())
    return h.hexdigest()


def record_weight_digests(package: Path) -> dict[str, str]:
    """Write the SHA-256 of each weight file into the package's own metadata (model.mlmodel, which is not a weight
    file), so `verify` can tell a weight changed since export, however little. Returns the digests."""
    digests = weight_digests(package)
    spec_path = Path(package) / SPEC_FILE
    model = model_proto().Model()
    model.ParseFromString(spec_path.read_bytes())
    model.description.metadata.userDefined[WEIGHTS_SHA256] = json.dumps(digests, sort_keys=True)
    spec_path.write_bytes(model.SerializeToString())
    return digests


def changed_weight_files(view: PackageView) -> list[str]:
    """Each weight file against the digest the package records: what changed, went missing or was added since
    export, one line per file (empty when all are as exported, or for packages from before digests were recorded)."""
    recorded = view.meta.weights_sha256 if view.meta else {}
    if not recorded:
        return []
    if view.is_onnx:
        have = {ONNX_INITIALIZERS: onnx_weights_digest(view.onnx_weights)}
    elif view.is_aimodel:
        from edgecompile.coreai.convert import program_digests

        have = program_digests(view.path)
    else:
        have = weight_digests(view.path)
    changed = []
    for name in sorted(set(recorded) | set(have)):
        if recorded.get(name) != have.get(name):
            what = "is missing" if name not in have else "was added" if name not in recorded else "differs from the exported one (SHA-256)"
            changed.append(f"{view.path.name}/{name} {what}")
    return changed


def weight_file_bytes(package: Path) -> int:
    """The size of a .mlpackage's weight file(s)."""
    return sum(f.stat().st_size for f in (Path(package) / "Data" / "com.apple.CoreML" / "weights").glob("*") if f.is_file())



@dataclass
class PackageView:
    path: Path
    spec: Any
    program: Any
    metadata: dict[str, str]
    inputs: list[dict]
    outputs: list[dict]
    ops: dict[str, int] = field(default_factory=dict)
    onnx_weights: dict[str, np.ndarray] | None = None  # ONNX initializers; None for a Core ML package
    function: str = "main"  # the program function this view reads (a multifunction package has several)
    meta: PackageMetadata | None = None  # edgecompile's metadata, checked when read; None for a foreign package
    format: Format = Format.COREML

    @property
    def is_onnx(self) -> bool:
        return self.format is Format.ONNX

    @property
    def is_aimodel(self) -> bool:
        return self.format is Format.AIMODEL

    @property
    def config(self) -> dict | None:
        return self.meta.config if self.meta else None

    @property
    def width(self) -> float | None:
        return self.meta.width if self.meta else None

    @property
    def functions(self) -> dict[str, str]:
        """Function name -> "HxW" of a multifunction package, the default first; empty for a one-function one."""
        return self.meta.functions if self.meta else {}

    @property
    def latent_hw(self) -> tuple[int, int] | None:
        return self.meta.latent_of(self.function if self.functions else None) if self.meta else None

    @property
    def bits(self) -> Bits:
        return self.meta.bits if self.meta else Bits.FP16

    def with_function(self, name: str) -> PackageView:
        """The same package read through another of its functions (a Core ML program is not parsed again)."""
        if self.format is Format.COREML:
            return _coreml_view(self.path, self.spec, self.program, name)
        return load_package(self.path, function=name)

    @property
    def chunk(self) -> tuple[int, int] | None:
        """(k, N) for chunk k of a denoiser exported with --chunks N; None for a whole one."""
        return self.meta.chunk if self.meta else None

    @property
    def component(self) -> str | None:
        """The pipeline part a package is (text_encoder, decoder), for `export --pipeline`'s other packages."""
        return self.metadata.get(COMPONENT)

    def require_meta(self, command: str) -> PackageMetadata:
        """The metadata record, or the one-line error for a package edgecompile did not write."""
        if self.meta is None and self.component:
            raise EdgeCompileError(f"package {self.path} is the pipeline's {self.component}: `export --pipeline` verified it (report.json "
                                   f"'components'), and `sample` runs it from its Resources folder; {command} takes the denoiser")
        if self.meta is None:
            raise EdgeCompileError(f"package {self.path} has no edgecompile metadata: {command} works on packages written by `edgecompile export`")
        return self.meta

    @property
    def main(self):
        """The program function this view reads."""
        return self.program.functions[self.function]


def _feature(f) -> dict:
    arr = f.type.multiArrayType
    dtypes = {65568: "float32", 65552: "float16", 131104: "int32"}
    return {"name": f.name, "shape": [int(s) for s in arr.shape], "dtype": dtypes.get(arr.dataType, str(arr.dataType)),
            "description": f.shortDescription}


ONNX_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64"}


def _load_onnx(path: Path) -> PackageView:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise EdgeCompileError(f"ONNX file {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def feature(v, doc):
        t = v.type.tensor_type
        return {"name": v.name, "shape": [d.dim_value for d in t.shape.dim], "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)),
                "description": doc.get(v.name, "")}

    meta = {p.key: p.value for p in model.metadata_props}
    record = PackageMetadata.from_strings(meta, str(path))
    io_doc = record.io if record else {}
    init_names = {i.name for i in model.graph.initializer}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    view = PackageView(
        path=path, spec=None, program=None, metadata=meta, meta=record, format=Format.ONNX,
        inputs=[feature(v, io_doc) for v in model.graph.input if v.name not in init_names],
        outputs=[feature(v, io_doc) for v in model.graph.output],
        ops=dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        onnx_weights={i.name: numpy_helper.to_array(i) for i in model.graph.initializer},
    )
    check_program_matches(view)
    return view


def _load_aimodel(path: Path, function: str | None) -> PackageView:
    from edgecompile.coreai.runtime import feature, op_counts, read_asset

    _, summary, meta = read_asset(path)
    record = PackageMetadata.from_strings(meta, str(path))
    names = list(summary.function_names)
    chosen = function or (next(iter(record.functions)) if record and record.functions else names[0])
    if chosen not in names:
        raise EdgeCompileError(f"Core AI asset {path} has no function {chosen!r}: use one of {', '.join(names)}")
    io_doc = record.io if record else {}
    view = PackageView(path=path, spec=None, program=None, metadata=meta, meta=record, function=chosen, format=Format.AIMODEL,
                       inputs=[feature(n, d, io_doc) for n, d in summary.function_inputs(chosen)],
                       outputs=[feature(n, d, io_doc) for n, d in summary.function_outputs(chosen)], ops=op_counts(summary))
    check_program_matches(view)
    return view


def load_package(path: str | Path, function: str | None = None) -> PackageView:
    """A package read back; `function` picks one function of a multifunction package (default: its default)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise EdgeCompileError(f"package {path} is a symbolic link to nothing readable (missing, or a loop): pass the .mlpackage itself")
    if not path.exists():
        raise EdgeCompileError(f"package {path} not found: pass the .mlpackage written by `edgecompile export`")
    if path.suffix == ".onnx" and path.is_file():
        return _load_onnx(path)
    if path.suffix == Format.AIMODEL.suffix:
        return _load_aimodel(path, function)
    if not (path / "Manifest.json").is_file():
        raise EdgeCompileError(f"{path} is not an .mlpackage (no Manifest.json)")
    try:
        spec, program = load_mil_program(str(path))
    except EdgeCompileError:
        raise
    except Exception as e:
        raise EdgeCompileError(f"package {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return _coreml_view(path, spec, program, function)


def _coreml_view(path: Path, spec, program, function: str | None) -> PackageView:
    """One function of a parsed Core ML package (parsing is the expensive part: a view of another function reuses it)."""
    meta = dict(spec.description.metadata.userDefined)
    described = {f.name: f for f in spec.description.functions}
    if described:  # a multifunction package: each function describes its own inputs and outputs
        chosen = function or spec.description.defaultFunctionName
        if chosen not in described:
            raise EdgeCompileError(f"package {path} has no function {chosen!r}: use one of {', '.join(described)}")
        desc = described[chosen]
    elif function not in (None, "main"):
        raise EdgeCompileError(f"package {path} has one function: drop --function {function}")
    else:
        chosen, desc = "main", spec.description
    view = PackageView(
        path=path, spec=spec, program=program, metadata=meta, function=chosen, meta=PackageMetadata.from_strings(meta, str(path)),
        inputs=[_feature(f) for f in desc.input], outputs=[_feature(f) for f in desc.output],
    )
    view.ops = dict(sorted(collections.Counter(o.op_type for o in view.main.operations).items(), key=lambda kv: -kv[1]))
    check_program_matches(view)
    return view


def check_program_matches(view: PackageView) -> None:
    """The metadata agrees with the program it describes: the latent input has the recorded channels and size."""
    if view.meta is None:
        return
    for f in view.inputs:
        if f["name"] == LATENT:
            want = [view.meta.config.get("latent_channels"), *view.latent_hw]
            if list(f["shape"][1:]) != want:
                raise EdgeCompileError(f"package {view.path}: its program takes {LATENT} of shape {f['shape']}, but its metadata "
                                       f"says {want} (channels, H, W): the metadata was edited; re-export the package")


def load_chain(view: PackageView) -> list[PackageView]:
    """The packages a chunk runs with, in order, read from beside it (a whole package is its own chain)."""
    if view.chunk is None:
        return [view]
    k, n = view.chunk
    names = view.meta.chunk_packages
    chain = []
    for i, name in enumerate(names, start=1):
        path = view.path.parent / name
        if not path.exists():
            raise EdgeCompileError(f"package {view.path} is chunk {k} of {n}: keep every chunk beside it ({name} is missing)")
        other = view if path.resolve() == view.path.resolve() else load_package(path)
        if other.chunk != (i, n) or other.meta.binding() != view.meta.binding():
            raise EdgeCompileError(f"{path} is not chunk {i} of the export {view.path} belongs to: keep the chunks of one export together")
        chain.append(other)
    return chain


def block_of_ops(view: PackageView) -> dict[str, str]:
    """Attribute each op to a transformer block ('down.0', ...) by dataflow: an op belongs to the block whose
    weights it reads, else to the block of its first computed input. Ops outside any block map to 'other'."""
    owner: dict[str, str] = {}
    for o in view.main.operations:
        block = None
        for v in o.inputs.values():
            for var in v if isinstance(v, (list, tuple)) else [v]:
                m = BLOCK_NAME.match(var.name)
                if m and var.op is not None and (var.op.op_type == "const" or var.op.op_type.startswith("constexpr")):
                    block = f"{m.group(1)}.{m.group(2)}"
                    break
            if block:
                break
        if block is None:
            for v in o.inputs.values():
                var = v[0] if isinstance(v, (list, tuple)) and v else v
                if not isinstance(var, (list, tuple)) and var.name in owner:
                    block = owner[var.name]
                    break
        for out in o.outputs:
            owner[out.name] = block or "other"
        owner[o.name] = block or "other"
    return owner


def layout_ops_per_block(view: PackageView) -> dict[str, dict[str, int]]:
    if view.is_onnx:
        return {"all": {k: view.ops.get(k.capitalize(), 0) for k in LAYOUT_OPS}}
    if view.is_aimodel:  # Core AI's program keeps no per-layer op names: the whole program's counts
        return {"all": {k: view.ops.get(k, 0) for k in LAYOUT_OPS}}
    owner = block_of_ops(view)
    per: dict[str, dict[str, int]] = collections.defaultdict(lambda: {k: 0 for k in LAYOUT_OPS})
    for o in view.main.operations:
        if o.op_type in LAYOUT_OPS:
            per[owner[o.name]][o.op_type] += 1
    return dict(sorted(per.items()))


def weight_census(view: PackageView) -> dict[str, Any]:
    """Bytes of weights as stored: dense consts at their dtype, palettized ones as indices + LUT."""
    if view.is_aimodel:
        from edgecompile.coreai.runtime import read_asset, weight_census as asset_census

        return asset_census(view.path, read_asset(view.path)[1])
    if view.is_onnx:
        floats = [w for w in view.onnx_weights.values() if w.dtype.kind == "f" and w.size >= 16]
        dtypes = sorted({str(w.dtype) for w in floats})
        return {"weight_bytes": int(sum(w.nbytes for w in floats)), "dense_bytes": int(sum(w.nbytes for w in floats)),
                "palettized_bytes": 0, "dense_tensors": len(floats), "palettized_tensors": 0, "average_bits": None,
                "bits_per_layer": {}, "weight_dtypes": dtypes}
    dense = palettized = 0
    n_dense = n_palettized = 0
    palettized_bits: dict[str, float] = {}
    for o in view.main.operations:
        if o.op_type == "const":
            val = o.outputs[0].val
            if isinstance(val, np.ndarray) and val.size >= 16 and val.dtype.kind == "f":
                dense += val.nbytes
                n_dense += 1
        elif o.op_type == "constexpr_lut_to_dense":
            ins = {k: v.val for k, v in o.inputs.items()}
            lut, idx = ins["lut"], ins["indices"]
            nbits = int(round(np.log2(lut.shape[-2] if "shape" not in ins else lut.shape[-1])))
            numel = int(np.prod(ins["shape"])) if "shape" in ins else idx.size
            nbytes = numel * nbits / 8 + lut.nbytes
            palettized += nbytes
            n_palettized += 1
            palettized_bits[o.outputs[0].name] = (nbits, numel)
    total_w = sum(n for _, n in palettized_bits.values())
    avg = sum(b * n for b, n in palettized_bits.values()) / total_w if total_w else None
    return {
        "weight_bytes": int(dense + palettized), "dense_bytes": int(dense), "palettized_bytes": int(palettized),
        "dense_tensors": n_dense, "palettized_tensors": n_palettized, "average_bits": avg,
        "bits_per_layer": {k: b for k, (b, _) in palettized_bits.items()},
    }

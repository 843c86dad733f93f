"""An `.aimodel` read back and run by Core AI's own runtime (coreai-core: a local runtime on Linux, the OS framework
on macOS 27+). Everything in coreai.runtime is async; `AIModelRunner` keeps one event loop and one loaded model
for the life of a verification, so each call is a plain function call."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np

from edgecompile.coreai.convert import import_coreai, quiet_coreai
from edgecompile.errors import EdgeCompileError

SUFFIX = ".aimodel"


def read_asset(path: Path):
    """(asset, summary, custom metadata as strings) of an `.aimodel` folder, or a one-line error."""
    _, asset_mod = import_coreai()
    if not path.is_dir() or not asset_mod.AIModelAsset.is_valid(path):
        raise EdgeCompileError(f"{path} is not a Core AI asset (an .aimodel folder with a program): pass the .aimodel `export --format aimodel` wrote")
    try:
        asset = asset_mod.AIModelAsset.load(path)
        summary = asset.summary(include_statistics=True)
        custom = {k: v if isinstance(v, str) else str(v) for k, v in asset.metadata.creator_defined_metadata.items()}
    except RuntimeError as e:
        raise EdgeCompileError(f"Core AI asset {path} could not be read ({str(e).splitlines()[0]})") from None
    if summary is None:
        raise EdgeCompileError(f"Core AI asset {path} has no program (main.mlirb): re-export it")
    return asset, summary, custom


_DTYPES = {"Float32": "float32", "Float16": "float16", "Int32": "int32"}


def feature(name: str, desc: str, doc: dict[str, str]) -> dict:
    """('x', 'NDArray (Float32, 1 × 4 × 8 × 8)') -> the feature record PackageView holds."""
    inner = desc[desc.find("(") + 1 : desc.rfind(")")]
    dtype, _, dims = inner.partition(",")
    shape = [int(d) for d in dims.replace("×", " ").split()] if dims.strip() else []
    return {"name": name, "shape": shape, "dtype": _DTYPES.get(dtype.strip(), dtype.strip()), "description": doc.get(name, "")}


def op_counts(summary) -> dict[str, int]:
    counts = {}
    for entry in summary.operation_distribution:  # "(name, count)" strings or (name, count) pairs
        if isinstance(entry, str):
            name, _, count = entry.strip("()").rpartition(",")
            counts[name.strip()] = int(count)
        else:
            counts[str(entry[0])] = int(entry[1])
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class AIModelRunner:
    """feeds (name -> array) -> outputs (name -> float32 array), through Core AI's runtime."""

    def __init__(self, path: Path, function: str = "main"):
        import coreai.runtime as rt

        _, asset_mod = import_coreai()
        self._rt = rt
        self._loop = asyncio.new_event_loop()
        self._context = asset_mod.AIModelAsset.load(Path(path)).executable()
        try:
            with quiet_coreai():
                model = self._loop.run_until_complete(self._context.__aenter__())
            if function not in model.function_names:
                raise EdgeCompileError(f"Core AI asset {path} has no function {function!r}: use one of {', '.join(model.function_names)}")
            with quiet_coreai():
                self._function = model.load_function(function)
        except RuntimeError as e:
            self.close()
            raise EdgeCompileError(f"Core AI's runtime could not load {path} ({str(e).splitlines()[0]})") from None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: self._rt.NDArray(np.ascontiguousarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else np.int32))
                  for k, v in feeds.items()}
        out = self._loop.run_until_complete(self._function(arrays))
        return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in out.items()}

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self._context.__aexit__(None, None, None))
        except Exception:  # noqa: BLE001 - a model that never loaded has nothing to release
            pass
        self._loop.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


_LUT_OP = re.compile(r"= coreai\.lut_to_dense (%\d+), (%\d+), %\d+ : \(tensor<([0-9x]+)xui(\d+)>, tensor<([0-9x]+)xf16>")
_CONSTANT = r"^\s*{}\s*=\s*coreai\.constant (dense_resource<(\w+)>|dense<(.*?)>) : tensor<"


def asset_luts(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every LUT constant of the asset's program, decoded: (lut (G, 2^n) fp16, indices (the weight's shape) uint8),
    in program order. Read from the program's text (MLIR): inline `dense<...>` values or `dense_resource` blobs
    (a 4-byte alignment header, then the data: fp16 little-endian; indices packed n bits each, lowest bits first)."""
    _, asset_mod = import_coreai()
    text = str(asset_mod.AIModelAsset.load(Path(path)).program)
    blobs = dict(re.findall(r'^\s*(resource_\w+): "0x([0-9A-Fa-f]*)"', text, flags=re.M))

    def constant(name: str) -> tuple[bytes | None, str | None]:
        m = re.search(_CONSTANT.format(re.escape(name)), text, flags=re.M)
        if m is None:
            raise EdgeCompileError(f"{path}: the program's constant {name} was not found")
        if m.group(2):
            return bytes.fromhex(blobs[m.group(2)])[4:], None
        return None, m.group(3)

    out = []
    for ind_name, lut_name, ind_shape, nbits, lut_shape in _LUT_OP.findall(text):
        ind_shape = [int(d) for d in ind_shape.split("x")]
        lut_shape = [int(d) for d in lut_shape.split("x")]
        nbits, count = int(nbits), int(np.prod(ind_shape))
        raw, inline = constant(lut_name)
        if raw is not None:
            lut = np.frombuffer(raw, dtype="<f2")
        else:
            lut = np.array([float(v) for v in re.findall(r"[-+]?[0-9.]+(?:e[-+]?\d+)?|nan|inf", inline)], np.float32).astype(np.float16)
        lut = lut.reshape(int(np.prod(lut_shape[:-2])), lut_shape[-2])
        raw, inline = constant(ind_name)
        if raw is None:
            indices = np.array([int(v) for v in re.findall(r"\d+", inline)], np.uint8)
            indices = np.broadcast_to(indices, (count,)) if indices.size == 1 else indices
        else:
            bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
            indices = (bits.astype(np.uint16) << np.arange(nbits, dtype=np.uint16)).sum(1).astype(np.uint8)
        out.append((lut, indices.reshape(ind_shape)))
    return out


_STORAGE_BITS = {"Float32": 32, "Float16": 16, "BFloat16": 16, "Int32": 32, "UInt32": 32, "Int16": 16, "UInt16": 16, "Int8": 8, "UInt8": 8,
                 "UInt6": 6, "UInt4": 4, "UInt3": 3, "UInt2": 2, "UInt1": 1, "Int64": 64, "UInt64": 64}


def weight_census(path: Path, summary) -> dict:
    """Bytes of constants as the asset stores them (its summary's element counts per storage type), and of the
    LUT constants among them (indices at their bits, plus the LUTs)."""
    luts = asset_luts(path)
    total = 0.0
    dtypes = set()
    for entry in summary.storage_types:  # "(Float32, 93267)" or (name, count)
        name, count = (entry.strip("()").split(",") if isinstance(entry, str) else entry)
        total += int(count) * _STORAGE_BITS.get(str(name).strip(), 32) / 8
        dtypes.add(_DTYPES.get(str(name).strip(), str(name).strip().lower()))
    palettized, bits_per_layer, weighted = 0.0, {}, 0
    for k, (lut, indices) in enumerate(luts):
        nbits = int(round(np.log2(lut.shape[-1])))
        palettized += indices.size * nbits / 8 + lut.nbytes
        bits_per_layer[f"lut_{k}"] = nbits
        weighted += nbits * indices.size
    elements = sum(i.size for _, i in luts)
    return {"weight_bytes": int(total), "dense_bytes": int(total - palettized), "palettized_bytes": int(palettized),
            "dense_tensors": None, "palettized_tensors": len(luts), "average_bits": weighted / elements if elements else None,
            "bits_per_layer": bits_per_layer, "weight_dtypes": sorted(dtypes)}

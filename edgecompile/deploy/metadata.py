"""The edgecompile metadata every exported package carries (Core ML user metadata, ONNX metadata_props), as one
typed record. This module is the only place its key strings are spelled: writers call `to_strings()`, readers
`PackageMetadata.from_strings()`, which checks every field as it reads it (type, range, and the consistency of
fields with each other), so a tampered or hand-edited package is a one-line error naming the key, never a
traceback or a silent misreading.

Values are strings (Core ML's metadata map holds strings only): numbers in decimal, structures as JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace

from edgecompile import __version__
from edgecompile.choices import KEEP_FP16, LAYER_BITS, Bits
from edgecompile.digest import sha256_json
from edgecompile.errors import EdgeCompileError

PREFIX = "edgecompile."
VERSION = PREFIX + "version"
WIDTH = PREFIX + "width"
PARAMS = PREFIX + "params"
BITS = PREFIX + "bits"
LATENT = PREFIX + "latent"
CONFIG = PREFIX + "config"
CONFIG_SHA256 = PREFIX + "config_sha256"
CHECKPOINT_SHA256 = PREFIX + "checkpoint_sha256"
IO = PREFIX + "io"
BITS_PER_LAYER = PREFIX + "bits_per_layer"
GROUP_SIZE = PREFIX + "group_size"
PALETTES_SHA256 = PREFIX + "palettes_sha256"  # the palettes sidecar (compress/sidecars.py)
DISTILLED_SHA256 = PREFIX + "distilled_sha256"  # the distilled-parameters sidecar
CHUNK = PREFIX + "chunk"  # "k/N": chunk k of N (deploy/chunks.py)
CHUNK_PACKAGES = PREFIX + "chunk_packages"  # JSON list: every chunk's file name, in run order
# Multifunction packages (--latent A,B,...; iOS18): one function per latent size, weights stored once
FUNCTIONS = PREFIX + "functions"  # JSON object: function name -> "HxW", the default function first
WEIGHTS_SHA256 = PREFIX + "weights_sha256"  # JSON object: weight file (relative to the package) -> SHA-256
COMPUTE = PREFIX + "compute"  # the precision the program computes in: float16 (an fp32 timestep island kept) or float32
COMPUTE_PRECISIONS = ("float16", "float32")
COMPONENT = PREFIX + "component"  # the pipeline part a package is: text_encoder, decoder (a denoiser has none)
COMPONENT_INFO = PREFIX + "component_info"  # JSON object: its source class, text length, latent scaling, ...

NO_CHECKPOINT = "none"  # checkpoint_sha256 of a package whose checkpoint had no file (an in-memory model)
MAX_LATENT_TEXT = 16  # "HxW" of two sides of at most 7 digits
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LATENT = re.compile(r"^([1-9][0-9]{0,6})x([1-9][0-9]{0,6})$")
_CHUNK = re.compile(r"^([1-9][0-9]{0,3})/([1-9][0-9]{0,3})$")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9._-]+\.(mlpackage|onnx|aimodel)$")


def latent_text(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


@dataclass(frozen=True)
class PackageMetadata:
    width: float
    params: int
    bits: Bits
    latent_hw: tuple[int, int]
    config: dict
    checkpoint_sha256: str | None  # None: exported from a model with no checkpoint file
    io: dict[str, str]  # input/output name -> what it means (deploy/contract.py io_doc)
    version: str = __version__
    bits_per_layer: dict[str, int] | None = None  # palettized packages: layer -> bits (KEEP_FP16 keeps fp16)
    group_size: int | None = None  # per-grouped-channel LUTs (iOS18)
    palettes_sha256: str | None = None
    distilled_sha256: str | None = None
    chunk: tuple[int, int] | None = None  # (k, N) for chunk k of N
    chunk_packages: tuple[str, ...] = ()
    functions: dict[str, str] = field(default_factory=dict)  # function -> "HxW", the default first
    weights_sha256: dict[str, str] = field(default_factory=dict)
    compute: str | None = None  # COMPUTE_PRECISIONS; None: a package from before it was recorded

    @property
    def config_sha256(self) -> str:
        return sha256_json(self.config)

    @property
    def palettized(self) -> bool:
        return self.bits.palettized

    def with_(self, **changes) -> PackageMetadata:
        return replace(self, **changes)

    def to_strings(self) -> dict[str, str]:
        """The metadata map written into a package."""
        d = {
            VERSION: self.version,
            WIDTH: repr(float(self.width)),
            PARAMS: str(self.params),
            BITS: self.bits.value,
            LATENT: latent_text(self.latent_hw),
            CONFIG: json.dumps(self.config, sort_keys=True),
            CONFIG_SHA256: self.config_sha256,
            CHECKPOINT_SHA256: self.checkpoint_sha256 or NO_CHECKPOINT,
            IO: json.dumps(self.io),
        }
        if self.bits_per_layer is not None:
            d[BITS_PER_LAYER] = json.dumps(self.bits_per_layer, sort_keys=True)
            d[GROUP_SIZE] = str(self.group_size or 0)
        if self.palettes_sha256:
            d[PALETTES_SHA256] = self.palettes_sha256
        if self.distilled_sha256:
            d[DISTILLED_SHA256] = self.distilled_sha256
        if self.chunk is not None:
            d[CHUNK] = f"{self.chunk[0]}/{self.chunk[1]}"
            d[CHUNK_PACKAGES] = json.dumps(list(self.chunk_packages))
        if self.functions:
            d[FUNCTIONS] = json.dumps(self.functions)
        if self.weights_sha256:
            d[WEIGHTS_SHA256] = json.dumps(self.weights_sha256, sort_keys=True)
        if self.compute is not None:
            d[COMPUTE] = self.compute
        return d

    @classmethod
    def from_strings(cls, meta: dict[str, str], where: str) -> PackageMetadata | None:
        """The record read back from a package's metadata map, every field checked; None when the package has no
        edgecompile metadata at all (not written by `edgecompile export`). `where` names the package in errors."""
        if not any(k.startswith(PREFIX) for k in meta) or meta.get(COMPONENT, "denoiser") != "denoiser":
            return None  # not edgecompile's, or another part of a pipeline (component_metadata)
        r = _Reader(meta, where)
        bits = r.choice(BITS, Bits)
        config = r.json(CONFIG, dict)
        if r.text(CONFIG_SHA256) != sha256_json(config):
            raise r.bad(CONFIG, "does not match its recorded SHA-256 (the config was edited or replaced)")
        width = r.number(WIDTH, float)
        if not (0 < width <= 1):
            raise r.bad(WIDTH, f"{width!r} is not a width in (0, 1]")
        widths = config.get("widths")
        if isinstance(widths, list) and widths and not any(isinstance(v, (int, float)) and abs(v - width) < 1e-9 for v in widths):
            raise r.bad(WIDTH, f"{width:g} is not one of the config's widths {widths}")
        params = r.number(PARAMS, int)
        if params < 1:
            raise r.bad(PARAMS, f"{params} is not a positive parameter count")
        latent_hw = r.latent(LATENT)
        checkpoint = r.text(CHECKPOINT_SHA256)
        if checkpoint != NO_CHECKPOINT:
            r.sha(CHECKPOINT_SHA256)
        io = r.json(IO, dict, default={})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in io.items()):
            raise r.bad(IO, "is not an object of names and descriptions")
        bits_per_layer = group_size = None
        if BITS_PER_LAYER in meta:
            bits_per_layer = r.json(BITS_PER_LAYER, dict)
            odd = [n for n, b in bits_per_layer.items() if isinstance(b, bool) or b not in LAYER_BITS]
            if odd:
                raise r.bad(BITS_PER_LAYER, f"layer {odd[0]} has bits {bits_per_layer[odd[0]]!r}, not one of {LAYER_BITS}")
            group_size = r.number(GROUP_SIZE, int, default=0)
            if group_size < 0:
                raise r.bad(GROUP_SIZE, f"{group_size} is negative")
            group_size = group_size or None
        if bits.palettized and bits_per_layer is None:
            raise r.bad(BITS, f"says {bits.value}-bit weights but {BITS_PER_LAYER} is missing")
        if not bits.palettized and bits_per_layer is not None and any(b != KEEP_FP16 for b in bits_per_layer.values()):
            raise r.bad(BITS_PER_LAYER, "names palettized layers in an fp16 package")
        if bits.uniform is not None and any(b not in (bits.uniform, KEEP_FP16) for b in bits_per_layer.values()):
            raise r.bad(BITS_PER_LAYER, f"holds other bit-widths than the package's {bits.value}")
        chunk, chunk_packages = None, ()
        if CHUNK in meta:
            m = _CHUNK.match(r.text(CHUNK))
            if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
                raise r.bad(CHUNK, f"{meta[CHUNK]!r} is not k/N with 1 <= k <= N")
            chunk = (int(m.group(1)), int(m.group(2)))
            names = r.json(CHUNK_PACKAGES, list)
            if len(names) != chunk[1] or not all(isinstance(n, str) and _SAFE_FILE.match(n) for n in names):
                raise r.bad(CHUNK_PACKAGES, f"is not a list of {chunk[1]} package file names")
            chunk_packages = tuple(names)
        functions = {}
        if FUNCTIONS in meta:
            functions = r.json(FUNCTIONS, dict)
            for name, hw in functions.items():
                if not isinstance(hw, str) or not _LATENT.match(hw):
                    raise r.bad(FUNCTIONS, f"function {name!r} has latent {hw!r}, not HxW")
        weights = {}
        if WEIGHTS_SHA256 in meta:
            weights = r.json(WEIGHTS_SHA256, dict)
            if not all(isinstance(k, str) and ".." not in k.split("/") and not k.startswith("/") and isinstance(v, str) and _SHA256.match(v)
                       for k, v in weights.items()):
                raise r.bad(WEIGHTS_SHA256, "is not an object of weight files and SHA-256 digests")
        compute = r.text(COMPUTE, default=None)
        if compute is not None and compute not in COMPUTE_PRECISIONS:
            raise r.bad(COMPUTE, f"{compute!r} is not one of {', '.join(COMPUTE_PRECISIONS)}")
        return cls(width=width, params=params, bits=bits, latent_hw=latent_hw, config=config, compute=compute,
                   checkpoint_sha256=None if checkpoint == NO_CHECKPOINT else checkpoint, io=io,
                   version=r.text(VERSION, default="unknown"), bits_per_layer=bits_per_layer, group_size=group_size,
                   palettes_sha256=r.sha(PALETTES_SHA256) if PALETTES_SHA256 in meta else None,
                   distilled_sha256=r.sha(DISTILLED_SHA256) if DISTILLED_SHA256 in meta else None,
                   chunk=chunk, chunk_packages=chunk_packages, functions=functions, weights_sha256=weights)

    def latent_of(self, function: str | None) -> tuple[int, int]:
        """The latent size of one function of a multifunction package (its own size otherwise)."""
        raw = self.functions.get(function) if function else None
        return parse_latent_text(raw) if raw else self.latent_hw

    def binding(self) -> tuple:
        """What every chunk of one export shares: a chunk whose binding differs belongs to another export."""
        return (self.checkpoint_sha256, self.config_sha256, self.width, self.latent_hw, self.bits, self.chunk_packages)


def component_metadata(kind: str, checkpoint_sha256: str | None, info: dict) -> dict[str, str]:
    """The metadata map of a pipeline component's package (text encoder, decoder): what it is and where it came from."""
    return {VERSION: __version__, COMPONENT: kind, CHECKPOINT_SHA256: checkpoint_sha256 or NO_CHECKPOINT,
            COMPONENT_INFO: json.dumps(info, sort_keys=True)}


def parse_latent_text(text: str) -> tuple[int, int]:
    m = _LATENT.match(text)
    if not m:
        raise ValueError(text)
    return int(m.group(1)), int(m.group(2))


class _Reader:
    """Reads one metadata map, each failure a one-line error naming the package and the key."""

    _MISSING = object()

    def __init__(self, meta: dict[str, str], where: str):
        self.meta, self.where = meta, where

    def bad(self, key: str, why: str) -> EdgeCompileError:
        return EdgeCompileError(f"package {self.where}: metadata {key} {why}: re-export it with `edgecompile export`")

    def _absent(self, key: str, default):
        """What a key that is not there reads as: its default, or the error that it is missing."""
        if default is self._MISSING:
            raise self.bad(key, "is missing")
        return default

    def text(self, key: str, default=_MISSING) -> str:
        value = self.meta.get(key)
        if value is None:
            return self._absent(key, default)
        if not isinstance(value, str):
            raise self.bad(key, "is not text")
        return value

    def json(self, key: str, kind: type, default=_MISSING):
        raw = self.text(key, default=None)
        if raw is None:
            return self._absent(key, default)
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise self.bad(key, f"is not JSON ({raw[:40]!r})") from None
        if not isinstance(value, kind):
            raise self.bad(key, f"is not a JSON {'object' if kind is dict else 'list'}")
        return value

    def number(self, key: str, kind: type, default=_MISSING):
        raw = self.text(key, default=None)
        if raw is None:
            return self._absent(key, default)
        try:
            value = kind(raw.strip()) if len(raw) <= 32 else None
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)):
            raise self.bad(key, f"{raw[:40]!r} is not a {'whole ' if kind is int else ''}number")
        return value

    def choice(self, key: str, kind):
        raw = self.text(key)
        try:
            return kind(raw)
        except ValueError:
            raise self.bad(key, f"{raw[:40]!r} is not one of {', '.join(kind.values())}") from None

    def latent(self, key: str) -> tuple[int, int]:
        raw = self.text(key)
        try:
            return parse_latent_text(raw)
        except ValueError:
            raise self.bad(key, f"{raw[:MAX_LATENT_TEXT]!r} is not HxW with positive sides") from None

    def sha(self, key: str) -> str:
        raw = self.text(key)
        if not _SHA256.match(raw):
            raise self.bad(key, f"{raw[:40]!r} is not a SHA-256 digest")
        return raw

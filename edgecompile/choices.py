"""Every closed set of choices edgecompile takes, defined once: the CLI's `click.Choice`s, the option groups'
validation and the error messages all derive from these enums (`Choice.values()`, `Choice.parse`).

Members are `str`s, so `opts.bits == "mixed"` and `json.dumps` keep working on the plain value, and `str()` /
f-strings print the value, not the member name."""

from __future__ import annotations

from enum import Enum

from edgecompile.errors import EdgeCompileError


class Choice(str, Enum):
    """A closed set of option values; `parse` turns a user's value into a member or a one-line error."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value, option: str):
        """`value` as a member; anything else is the one-line error `--option X is not supported: use one of ...`."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value))
        except ValueError:
            raise EdgeCompileError(f"{option} {value} is not supported: use one of {', '.join(cls.values())}") from None


class Bits(Choice):
    """`--bits`: fp16 weights, one palette bit-width for every layer, or a mixed-bit recipe (the sweep)."""

    FP16 = "16"
    EIGHT = "8"
    SIX = "6"
    FOUR = "4"
    MIXED = "mixed"

    @property
    def palettized(self) -> bool:
        return self is not Bits.FP16

    @property
    def uniform(self) -> int | None:
        """The one bit-width of every layer (8, 6, 4), or None for fp16 and mixed."""
        return int(self.value) if self not in (Bits.FP16, Bits.MIXED) else None

    @property
    def tag(self) -> str:
        """How a package's file name says it: fp16, 4bit, mixedbit."""
        return {"16": "fp16", "mixed": "mixedbit"}.get(self.value, f"{self.value}bit")


# Per-layer bit-widths (recipes, package metadata, palettes): the LUT sizes constexpr_lut_to_dense takes before
# iOS18, and KEEP_FP16 for a layer left unpalettized.
PALETTE_BITS = (1, 2, 4, 6, 8)
KEEP_FP16 = 16
LAYER_BITS = (*PALETTE_BITS, KEEP_FP16)


class PaletteMethod(Choice):
    """`--palettes`: how each layer's LUT and indices are chosen (compress/palettize_model.py)."""

    OUTPUT_AWARE = "output-aware"  # Fisher-weighted LUT, error-compensating indices
    WEIGHTED = "weighted"  # the same LUT, nearest indices (what SKM does)
    PLAIN = "plain"  # k-means on the weights alone


class SweepMode(Choice):
    """`--sweep-mode`: the sensitivity signal of the mixed-bit sweep (compress/sensitivity.py)."""

    PROPAGATED = "propagated"
    LOCAL = "local"
    E2E = "e2e"


class Format(Choice):
    """`--format`: the kind of file a package is (the target runtime's format)."""

    COREML = "coreml"
    ONNX = "onnx"
    AIMODEL = "aimodel"  # Core AI (2026): coreai-torch's asset, run by coreai-core's runtime on Linux and macOS

    @property
    def suffix(self) -> str:
        return {"coreml": ".mlpackage", "onnx": ".onnx", "aimodel": ".aimodel"}[self.value]


class Target(Choice):
    """`--target`: the Core ML deployment target (iOS18 adds grouped LUTs and multifunction packages)."""

    IOS17 = "iOS17"
    IOS18 = "iOS18"


class Runtime(Choice):
    """`--runtime`: what executes a package in verify and sample."""

    AUTO = "auto"  # Core ML on macOS, else the MIL interpreter; an .aimodel: Core AI's runtime
    COREML = "coreml"
    INTERPRETER = "interpreter"
    COREAI = "coreai"  # Core AI's own runtime (coreai-core), for .aimodel assets


class Precision(Choice):
    """`--precision`: the interpreter's arithmetic (fp32 proves the graph, fp16 predicts device numerics)."""

    FP32 = "fp32"
    FP16 = "fp16"


class Device(Choice):
    """`--device`: where torch work runs (model/device.py)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


class StorageDtype(Choice):
    """`--dtype` of a written checkpoint (init, import)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

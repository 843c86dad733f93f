"""report.json: what one width's export did and measured, built from the stage results.

The one schema of report.json (keys in this order; optional parts absent when the stage did not run):

    edgecompile, config, width, params, latent [H, W], bits, format, target, checkpoint, checkpoint_sha256,
    package (relative to the width's folder), torch_threads,
    heldout_psnr_db {palettized, distilled} (denoiser PSNR on calibration inputs held out of every compression step:
    the figure reported first), calibration {how the inputs were made, inputs, held_out}, palette_method,
    recipe {recipe.json}, bits_per_layer, average_bits, group_size, calibration_psnr_db {palettized, distilled}
    (on the inputs the steps used), distill {DistillResult}   -- palettized exports
    coremltools (version; Core ML exports), size_bytes (all chunks), chunks [ChunkReport]  -- --chunks N > 1,
    verify {VerifyResult; package relative to the width's folder; of the default function},
    functions [{name, latent, verify}]  -- a multifunction package (--latent A,B,...), stage_seconds {stage: s, in run order},
    stage_peak_memory_gib {stage: {host_rss: the process's resident peak so far, cuda_allocated: the stage's own
    CUDA peak, on CUDA}}

`ExportReport.from_dict(json.load(...))` reads it back; `path` (where the package was committed) is not part of
the file, since the folder can move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompile.compress.distill import DistillResult
from edgecompile.compress.kmeans import Palette
from edgecompile.compress.recipe import Recipe
from edgecompile.coreml.verify import VerifyResult
from edgecompile.errors import EdgeCompileError

REPORT_FILE = "report.json"
# what changes from run to run of the same export: the clock and the memory meter (report.json, recipe.json)
TIMING_KEYS = frozenset({"seconds", "kmeans_seconds", "forward_seconds", "cost_forward_passes", "stage_seconds",
                         "step_seconds", "stage_peak_memory_gib", "package_seconds", "reference_seconds", "chunks_seconds"})


def without_timings(value):
    """A report or recipe as a JSON value with its timings left out, to compare two runs' results."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@dataclass
class CompressionResult:
    """What calibrate -> sweep -> palettize -> self-distill produced for one width."""

    calibration: dict[str, Any]  # the calibration set's provenance and its number of inputs
    bits_per_layer: dict[str, int]
    average_bits: float
    group_size: int | None
    calibration_psnr_db: dict[str, float]  # palettized, and distilled when distillation ran
    # the same on calibration inputs held out of everything (statistics, sweep, distillation): the figure to trust
    heldout_psnr_db: dict[str, float] = field(default_factory=dict)
    palette_method: str = "plain"
    recipe: Recipe | None = None  # --bits mixed
    distill: DistillResult | None = None
    palettes: dict[str, Palette] = field(default_factory=dict, repr=False)  # written into the package, not the report

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"heldout_psnr_db": self.heldout_psnr_db, "calibration": self.calibration, "palette_method": self.palette_method}
        if self.recipe is not None:
            d["recipe"] = self.recipe.to_dict()
        d.update(bits_per_layer=self.bits_per_layer, average_bits=self.average_bits, group_size=self.group_size,
                 calibration_psnr_db=self.calibration_psnr_db)
        if self.distill is not None:
            d["distill"] = self.distill.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> CompressionResult:
        return cls(calibration=data["calibration"], bits_per_layer=data["bits_per_layer"], average_bits=data["average_bits"],
                   group_size=data["group_size"], calibration_psnr_db=data["calibration_psnr_db"],
                   heldout_psnr_db=data.get("heldout_psnr_db", {}), palette_method=data.get("palette_method", "plain"),
                   recipe=Recipe.from_dict(data["recipe"]) if "recipe" in data else None,
                   distill=DistillResult.from_dict(data["distill"]) if "distill" in data else None)


@dataclass
class ChunkReport:
    """One package of a denoiser exported in chunks (deploy/chunks.py), in run order."""

    package: str  # relative to the width's folder
    blocks: list[int]  # [start, end) in the flat block order down, middle, up
    inputs: dict[str, list[int]]  # name -> shape, in the order the program takes them
    outputs: dict[str, list[int]]
    size_bytes: int
    weight_file_bytes: int


@dataclass
class FunctionReport:
    """One function of a multifunction package (--latent A,B,...), the default first."""

    name: str
    latent: list[int]
    verify: VerifyResult | None = None


@dataclass
class ExportReport:
    edgecompile: str
    config: dict[str, Any]
    width: float
    params: int
    latent: list[int]
    bits: str
    format: str
    target: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    package: str  # relative to the width's folder
    torch_threads: int
    compression: CompressionResult | None = None
    coremltools: str | None = None
    size_bytes: int = 0
    chunks: list[ChunkReport] = field(default_factory=list)
    verify: VerifyResult | None = None  # of the default function when there are several
    functions: list[FunctionReport] = field(default_factory=list)  # a multifunction package's, each verified
    components: list[dict] = field(default_factory=list)  # --pipeline: text encoder, decoder (commands/pipeline.py)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_peak_memory_gib: dict[str, dict[str, float]] = field(default_factory=dict)
    path: str = ""  # the committed package; not written to report.json

    HEAD = ("edgecompile", "config", "width", "params", "latent", "bits", "format", "target", "checkpoint",
            "checkpoint_sha256", "package", "torch_threads")

    @property
    def average_bits(self) -> float:
        return self.compression.average_bits if self.compression else 16.0

    @property
    def folder(self) -> Path:
        """The width's folder (where report.json and the sample grids lie), from the committed package path."""
        return Path(self.path).parents[len(Path(self.package).parts) - 1]

    def sample_grids(self) -> list[Path]:
        """The PNG grids of the package's samples that verification wrote, one per function."""
        results = [f.verify for f in self.functions] if self.functions else [self.verify]
        grids = [self.folder / r.generation.grid for r in results if r is not None and r.generation is not None and r.generation.grid]
        return [g for g in grids if g.is_file()]

    @property
    def verified(self) -> bool:
        return self.verify is not None and self.verify.passed and all(f.verify is not None and f.verify.passed for f in self.functions)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {k: getattr(self, k) for k in self.HEAD}
        if self.compression is not None:
            d.update(self.compression.to_dict())
        if self.coremltools is not None:
            d["coremltools"] = self.coremltools
        d["size_bytes"] = self.size_bytes
        if self.chunks:
            d["chunks"] = [c.__dict__ for c in self.chunks]
        if self.verify is not None:
            d["verify"] = {**self.verify.to_dict(), "package": self.package}
        if self.functions:
            # the package path as committed (relative), not the staging folder verification ran in
            d["functions"] = [{"name": f.name, "latent": f.latent, "verify": {**f.verify.to_dict(), "package": self.package} if f.verify else None}
                              for f in self.functions]
        if self.components:
            d["components"] = self.components
        d["stage_seconds"] = self.stage_seconds
        d["stage_peak_memory_gib"] = self.stage_peak_memory_gib
        return d

    @classmethod
    def from_dict(cls, data: dict, path: str = "") -> ExportReport:
        return cls(**{k: data[k] for k in cls.HEAD},
                   compression=CompressionResult.from_dict(data) if "bits_per_layer" in data else None,
                   coremltools=data.get("coremltools"), size_bytes=data["size_bytes"],
                   chunks=[ChunkReport(**c) for c in data.get("chunks", [])],
                   verify=VerifyResult.from_dict(data["verify"]) if data.get("verify") else None,
                   functions=[FunctionReport(name=f["name"], latent=f["latent"], verify=VerifyResult.from_dict(f["verify"]) if f["verify"] else None)
                              for f in data.get("functions", [])],
                   components=data.get("components", []),
                   stage_seconds=data.get("stage_seconds", {}), stage_peak_memory_gib=data.get("stage_peak_memory_gib", {}),
                   path=path)

    @classmethod
    def read(cls, path: str | Path) -> ExportReport:
        """A report.json file (OUT/w0.5/report.json) or the width folder that holds it."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data, path=str(path.parent / data["package"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise EdgeCompileError(f"export report {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

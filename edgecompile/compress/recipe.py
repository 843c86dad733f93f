"""Mixed-bit recipes: the sweep -> allocation step as one function, and the reusable JSON file it writes.

Recipe JSON (`edgecompile sweep -o R.json`, reused with `edgecompile export --recipe R.json`):
    {"format": "edgecompile-recipe", "format_version": 1, "config": name, "width": 0.5,
     "mode": "propagated|local|e2e", "candidates": [4, 8], "target": {"bits": 4.3} | {"psnr_db": 40},
     "group_size": null | g, "average_bits": 4.29, "predicted_psnr_db": 41.2, "palettes": "output-aware|weighted|plain",
     "layers": {layer: {"bits": 4, "size": n, "sensitivity": {"4": s4, "8": s8}}},
     "sweep": {timings, cost_forward_passes}, "calibration": {how the inputs were made}}
`predicted_psnr_db` is measured on the calibration inputs with edgecompile's torch simulation of the recipe,
which decodes to exactly the weights written into the package.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgecompile.atomic import atomic_path
from edgecompile.compress.allocation import allocate_for_psnr, average_bits, greedy
from edgecompile.compress.calibration import CalibrationSet
from edgecompile.compress.palettize_model import PaletteCache
from edgecompile.compress.sensitivity import PropagatedScores, calibration_outputs, decoded_on_call, output_psnr, sweep
from edgecompile.choices import KEEP_FP16, LAYER_BITS, PALETTE_BITS
from edgecompile.errors import EdgeCompileError
from edgecompile.jsonutil import dumps

FORMAT = "edgecompile-recipe"
FORMAT_VERSION = 1
DEFAULT_TARGET_BITS = 4.3  # the paper's average


@dataclass
class Recipe:
    config: str
    width: float
    bits: dict[str, int]
    sizes: dict[str, int]
    mode: str | None = None
    candidates: list[int] = field(default_factory=list)
    target: dict = field(default_factory=dict)
    group_size: int | None = None
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)
    predicted_psnr_db: float | None = None
    palettes: str = "plain"  # the palette method the sweep scored (compress/palettize_model.py)
    sweep: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    @property
    def average_bits(self) -> float:
        return average_bits(self.bits, self.sizes)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config, "width": self.width,
            "mode": self.mode, "candidates": self.candidates, "target": self.target, "group_size": self.group_size,
            "average_bits": round(self.average_bits, 4), "predicted_psnr_db": self.predicted_psnr_db, "palettes": self.palettes,
            "layers": {n: {"bits": b, "size": self.sizes[n],
                           "sensitivity": {str(k): v for k, v in self.sensitivity.get(n, {}).items()}}
                       for n, b in self.bits.items()},
            "sweep": self.sweep, "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """The inverse of to_dict (load_recipe validates a file's content first)."""
        layers = data["layers"]
        return cls(
            config=data.get("config", ""), width=float(data["width"]),
            bits={n: v["bits"] for n, v in layers.items()}, sizes={n: int(v.get("size", 1)) for n, v in layers.items()},
            mode=data.get("mode"), candidates=data.get("candidates", []), target=data.get("target", {}),
            group_size=data.get("group_size"),
            sensitivity={n: {int(k): float(s) for k, s in v.get("sensitivity", {}).items()} for n, v in layers.items()},
            predicted_psnr_db=data.get("predicted_psnr_db"), palettes=data.get("palettes", "plain"), sweep=data.get("sweep", {}),
            calibration=data.get("calibration", {}),
        )

    def save(self, path: str | Path, force: bool = False, inputs=()) -> Path:
        with atomic_path(Path(path), force=force, is_dir=False, inputs=inputs) as tmp:
            tmp.write_text(dumps(self.to_dict()) + "\n")
        return Path(path)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise EdgeCompileError(f"recipe {path} not found: write one with `edgecompile sweep -o {path.name}`")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise EdgeCompileError(f"recipe {path} is not an {FORMAT} file (missing 'format': '{FORMAT}')")
        layers = data["layers"]
        width = data["width"]
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or not 0 < width <= 1:
            raise EdgeCompileError(f"recipe {path}: width {width!r} is not a width in (0, 1]")
        odd = sorted(n for n, v in layers.items() if isinstance(v["bits"], bool) or not isinstance(v["bits"], int))
        if odd:
            raise EdgeCompileError(f"recipe {path}: layer {odd[0]} has bits {layers[odd[0]]['bits']!r}, not a whole number of bits "
                                   f"(use one of {PALETTE_BITS} or {KEEP_FP16})")
        recipe = Recipe.from_dict(data)
    except EdgeCompileError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise EdgeCompileError(f"recipe {path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'bad field'})") from None
    bad = sorted(n for n, b in recipe.bits.items() if b not in LAYER_BITS)
    if bad:
        raise EdgeCompileError(f"recipe {path}: layer {bad[0]} has {recipe.bits[bad[0]]} bits; use one of {PALETTE_BITS} or {KEEP_FP16} (fp16)")
    return recipe


def check_recipe_fits(recipe: Recipe, layers: dict[str, nn.Module], width: float, source: str) -> None:
    """A recipe applies to one width of one architecture: every palettizable layer named, nothing else."""
    if abs(recipe.width - width) > 1e-9:
        raise EdgeCompileError(f"recipe {source} is for width {recipe.width:g}, not {width:g}: sweep this width or pass --width {recipe.width:g}")
    unknown = sorted(set(recipe.bits) - set(layers))
    if unknown:
        raise EdgeCompileError(f"recipe {source} names {len(unknown)} layer(s) this model does not have ({', '.join(unknown[:3])}): "
                               "was it made for another config?")
    missing = sorted(set(layers) - set(recipe.bits))
    if missing:
        raise EdgeCompileError(f"recipe {source} lacks {len(missing)} layer(s) ({', '.join(missing[:3])}): give every layer bits (16 keeps fp16)")


def simulated_psnr(model: nn.Module, cache: PaletteCache, bits: dict[str, int], calib: CalibrationSet,
                   reference: torch.Tensor, batch_size: int = 64) -> float:
    """Denoiser-output PSNR on the calibration set of the model with `bits` applied (the cache's palettes, decoded a
    layer at a time as it is called)."""
    with decoded_on_call(cache, bits):
        return output_psnr(reference, calibration_outputs(model, calib, batch_size))


def make_recipe(model: nn.Module, config_name: str, width: float, calib: CalibrationSet, candidates: list[int],
                mode: str = "propagated", target_bits: float | None = DEFAULT_TARGET_BITS, target_psnr_db: float | None = None,
                cache: PaletteCache | None = None, progress=None, batch_size: int = 64,
                scores: PropagatedScores | None = None) -> Recipe:
    """Sweep a deploy model on calibration inputs and allocate bits for a target average or a target PSNR (`scores`:
    the propagated sweep's, measured before with the cache's palettes)."""
    bad = [b for b in candidates if b not in PALETTE_BITS]
    if bad or not candidates:
        raise EdgeCompileError(f"--bits candidates {candidates} must be from {PALETTE_BITS} (e.g. --bits 4,8)")
    cache = cache or PaletteCache(model)
    result = sweep(model, calib, candidates, mode, cache, batch_size, progress, scores)
    reference = result.reference
    if target_psnr_db is not None:
        bits, psnr = allocate_for_psnr(result.sensitivity, result.sizes, candidates, target_psnr_db,
                                       lambda b: simulated_psnr(model, cache, b, calib, reference, batch_size))
        target = {"psnr_db": target_psnr_db}
    else:
        lo, hi = min(candidates), max(candidates)
        if not lo <= target_bits <= hi:
            raise EdgeCompileError(f"--target-bits {target_bits} is outside the candidate bit-widths {lo}..{hi}: choose a value in that range")
        bits, _ = greedy(result.sensitivity, result.sizes, candidates, target_bits)
        psnr = simulated_psnr(model, cache, bits, calib, reference, batch_size)
        target = {"bits": target_bits}
    sweep_info = result.to_dict()
    if result.psnr_db:
        sweep_info["single_layer_psnr_db"] = {n: {str(b): round(v, 3) for b, v in p.items()} for n, p in result.psnr_db.items()}
    return Recipe(config=config_name, width=width, bits=bits, sizes=result.sizes, mode=mode, candidates=sorted(candidates),
                  target=target, group_size=cache.group_size, sensitivity=result.sensitivity, predicted_psnr_db=round(psnr, 3),
                  palettes=cache.method,
                  sweep=sweep_info, calibration={**calib.meta, "inputs": len(calib)})

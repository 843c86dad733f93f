"""Device cost model: per-step latency estimated from the static analysis of a deploy graph.

Per op, a roofline: time = max(MACs / throughput of its class, weight bytes / memory bandwidth), plus a fixed
per-op overhead (ANE dispatch). Three throughputs are free parameters (matrix: 1x1 and other convs; attention
einsums; vector: elementwise work, tied to attention throughput by a fixed ratio) together with the overhead, and
are fitted to the paper's per-width latencies on the paper-scale config (calibration), then checked WITHOUT
refitting on the Fig. 3 ablation models rebuilt in recipes/ablation (validation). Results are estimates.

Device profiles (recipes/devices/*.yaml) hold the memory bandwidth, the calibration points and, for profiles
without published latencies, a scaling from a calibrated profile (peak-compute and bandwidth ratios).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from edgecompile.bench.static import ACT_BYTES, GraphStats, deploy_graph_stats
from edgecompile.errors import EdgeCompileError
from edgecompile.model.config import RECIPES_DIR, ModelConfig

DEVICES_DIR = RECIPES_DIR / "devices"
ABLATION_DIR = RECIPES_DIR / "ablation"
MATRIX = ("conv1x1", "conv_other")
ATTENTION = ("attn_bna", "attn_global", "attn_cross")
SRAM_BYTES = 4 * 2**20


@dataclass
class Coefficients:
    matrix_gmacs: float  # sustained GMAC/s on convolutions
    attention_gmacs: float  # sustained GMAC/s on attention einsums
    op_overhead_us: float
    vector_ratio: float  # elementwise throughput (elements/s) relative to attention_gmacs

    def throughput(self, cls: str) -> float:
        if cls in MATRIX:
            return self.matrix_gmacs * 1e9
        if cls in ATTENTION:
            return self.attention_gmacs * 1e9
        return self.attention_gmacs * 1e9 * self.vector_ratio


@dataclass
class DeviceProfile:
    name: str
    key: str
    memory_gbps: float
    vector_ratio: float
    calibration_points: list[dict] = field(default_factory=list)
    scaled_from: dict | None = None
    notes: str = ""

    @staticmethod
    def load(path: str | Path) -> DeviceProfile:
        path = Path(path)
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in DEVICES_DIR.glob("*.yaml")))
            raise EdgeCompileError(f"device profile {path} not found: use one of {known}")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise EdgeCompileError(f"device profile {path} cannot be read ({str(e).splitlines()[0]}): pass a YAML profile like "
                                   f"{DEVICES_DIR / 'iphone12.yaml'}") from None
        return DeviceProfile.from_dict(data, path)

    @staticmethod
    def from_dict(data, path: Path) -> DeviceProfile:
        """A profile's fields checked: a mapping with a name, a positive memory bandwidth, calibration points that
        name a config, a width and a latency (or a profile to scale from)."""
        def bad(why: str) -> EdgeCompileError:
            return EdgeCompileError(f"device profile {path}: {why}: see {DEVICES_DIR / 'iphone12.yaml'} for the format")

        if not isinstance(data, dict):
            raise bad(f"is {'empty' if data is None else 'a ' + type(data).__name__}, not a mapping of fields")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise bad("'name' must be text")

        def number(key, default=None, positive=True):
            v = data.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
                raise bad(f"'{key}' = {v!r} must be a positive number")
            return float(v)

        points = data.get("calibration_points", [])
        if not isinstance(points, list) or not all(isinstance(p, dict) and isinstance(p.get("config"), str) and "width" in p for p in points):
            raise bad("'calibration_points' must be a list of {config, width, ...} mappings")
        scaled = data.get("scaled_from")
        if scaled is not None and not isinstance(scaled, dict):
            raise bad("'scaled_from' must be a mapping")
        notes = data.get("notes", "")
        return DeviceProfile(name=name, key=path.stem, memory_gbps=number("memory_gbps"), vector_ratio=number("vector_ratio", 0.125),
                             calibration_points=points, scaled_from=scaled, notes=notes if isinstance(notes, str) else str(notes))


def find_profile(name: str) -> DeviceProfile:
    path = Path(name) if name.endswith(".yaml") else DEVICES_DIR / f"{name}.yaml"
    return DeviceProfile.load(path)


def estimate_ms(stats: GraphStats, bits: float, coef: Coefficients, memory_gbps: float, sram_bytes: float = SRAM_BYTES) -> float:
    bw = memory_gbps * 1e9
    total = 0.0
    for cls, macs, weight_elems, act_elems in stats.records:
        act_bytes = act_elems * ACT_BYTES
        traffic = weight_elems * bits / 8 + (act_bytes if act_bytes > sram_bytes else 0)  # small activations stay on chip
        total += max(macs / coef.throughput(cls), traffic / bw)
    return 1e3 * (total + len(stats.records) * coef.op_overhead_us * 1e-6)


@lru_cache(maxsize=32)
def reference_stats(config_path: str, width: float, latent: tuple[int, int] | None) -> GraphStats:
    config = ModelConfig.load(RECIPES_DIR.parent / config_path if not Path(config_path).is_absolute() else config_path)
    return deploy_graph_stats(config, width, latent)


def fit(profile: DeviceProfile) -> tuple[Coefficients, list[dict]]:
    """Fit the coefficients to the profile's calibration points (least squares on log latency)."""
    from scipy.optimize import least_squares

    points = [(p, reference_stats(p["config"], float(p["width"]), None)) for p in profile.calibration_points]
    if not points:
        raise EdgeCompileError(f"device profile {profile.key} has no calibration points")

    def coef_of(x):
        # attention einsums are never faster than convolutions on the ANE: attention = matrix x (0, 1]
        matrix = math.exp(x[0])
        return Coefficients(matrix, matrix * math.exp(-math.log1p(math.exp(x[1]))), math.exp(x[2]), profile.vector_ratio)

    def residuals(x):
        c = coef_of(x)
        return [math.log(estimate_ms(s, p["bits"], c, profile.memory_gbps) / p["latency_ms"]) for p, s in points]

    x0 = np.array([math.log(3000.0), 0.0, math.log(10.0)])
    best = least_squares(residuals, x0, method="lm" if len(points) >= 3 else "trf")
    c = coef_of(best.x)
    coef = Coefficients(round(c.matrix_gmacs, 1), round(c.attention_gmacs, 1), round(c.op_overhead_us, 3), c.vector_ratio)
    rows = [{"model": p.get("label", p["config"]), "config": p["config"], "width": p["width"], "bits": p["bits"], "gmacs": round(s.total_macs / 1e9, 1),
             "conv_gmacs": round(sum(s.macs[c] for c in MATRIX) / 1e9, 1),
             "paper_ms": p["latency_ms"], "estimate_ms": round(float(estimate_ms(s, p["bits"], coef, profile.memory_gbps)), 1)}
            for p, s in points]
    for r in rows:
        r["error_pct"] = round(100 * (r["estimate_ms"] - r["paper_ms"]) / r["paper_ms"], 1)
    return coef, rows


def validate(profile: DeviceProfile, coef: Coefficients) -> list[dict]:
    """The Fig. 3 ablation models (A)-(D), estimated with the calibrated coefficients (no refit)."""
    rows = []
    for path in sorted(ABLATION_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        rel = str(path.relative_to(RECIPES_DIR.parent))
        stats = reference_stats(rel, 1.0, None)
        est = estimate_ms(stats, data.get("bits", 16), coef, profile.memory_gbps)
        paper = data["paper_latency_ms"]
        rows.append({"model": f"({path.stem}) {data['model']['name']}", "config": rel, "params": stats.params,
                     "gmacs": round(stats.total_macs / 1e9, 1), "conv_gmacs": round(sum(stats.macs[c] for c in MATRIX) / 1e9, 1),
                     "paper_ms": paper, "estimate_ms": round(float(est), 1), "error_pct": round(100 * (est - paper) / paper, 1)})
    return rows


def calibrated(profile_name: str) -> dict:
    """The coefficients of a profile (fitted, or scaled from a fitted one) with calibration and validation tables."""
    profile = find_profile(profile_name)
    if profile.scaled_from:
        base = calibrated(profile.scaled_from["profile"])
        s = profile.scaled_from
        c = base["coefficients"]
        coef = Coefficients(c.matrix_gmacs * s["compute_ratio"], c.attention_gmacs * s["compute_ratio"],
                            c.op_overhead_us * s.get("overhead_ratio", 1.0), profile.vector_ratio)
        return {"profile": profile, "coefficients": coef, "calibration": [], "validation": [],
                "calibration_error_pct": None, "validation_error_pct": None,
                "derivation": f"scaled from {base['profile'].name}: compute x{s['compute_ratio']}, overhead x{s.get('overhead_ratio', 1.0)}"}
    coef, cal = fit(profile)
    val = validate(profile, coef)
    return {"profile": profile, "coefficients": coef, "calibration": cal, "validation": val,
            "calibration_error_pct": max(abs(r["error_pct"]) for r in cal),
            "validation_error_pct": max(abs(r["error_pct"]) for r in val) if val else None, "derivation": "fitted"}

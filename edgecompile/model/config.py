"""The model config: one validated dataclass, loaded from YAML or JSON (recipes/*.yaml).

Every dimension of every width is derived here (`ModelConfig.dims`), so the reference model, the deploy
rewrite, the compressor and the cost model all read the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgecompile.errors import EdgeCompileError

BNA_TILINGS = ("grid", "sequence")
DOWN_UP_ATTENTIONS = ("assa", "full")
# What the denoiser predicts, and so its timestep units and the sampler that drives it (model/sampling.py):
# "flow": rectified-flow velocity, t in [0, 1] (SnapGen++); "epsilon": DDPM noise, t in [0, train_timesteps)
# (PixArt and other diffusers DiTs).
PREDICTIONS = ("flow", "epsilon")
# The 2-D sin-cos position table: "sincos" (rows in the first half of the channels, one unit per token);
# "pixart" (diffusers' convention: columns first, positions scaled by position_base_size / grid and divided by
# position_interpolation_scale).
POSITION_TABLES = ("sincos", "pixart")


MAX_BLOCKS = 512  # the paper's largest model has 22; bounds what building a config (even on the meta device) costs
MAX_LATENT_SIDE = 1024  # an 8192-pixel image with an 8x VAE
FIELD_LIMITS = {
    "latent_channels": 1024, "patch_size": 64, "hidden_dim": 65536, "head_dim": 4096, "num_heads": 4096,
    "num_kv_heads": 4096, "text_dim": 65536, "text_len": 65536, "ffn_ratio": 64, "ffn_ratio_middle": 64,
    "kv_compression": 64, "bna_blocks": 65536, "bna_radius": 64, "frequency_dim": 65536, "train_timesteps": 100000,
    "vae_scale_factor": 64, "position_base_size": 65536, "position_interpolation_scale": 1024,
    "depth_down": MAX_BLOCKS, "depth_middle": MAX_BLOCKS, "depth_up": MAX_BLOCKS,
}
KIND_TEXT = {"int": "a whole number", "float": "a finite number", "bool": "true or false", "str": "a non-empty name",
             "tuple[int, int]": "a list of whole numbers [H, W]", "tuple[float, ...]": "a list of finite numbers"}


def _is_whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def width_label(width: float) -> str:
    """Canonical text for a width: '0.375', '0.5', '1.0' (JSON keys, file names, metadata)."""
    return repr(float(width))


def width_key(width: float) -> str:
    """Module-name-safe form of a width ('w0_375'): per-width parameters live under this key."""
    return "w" + width_label(width).replace(".", "_")


@dataclass(frozen=True)
class WidthDims:
    """The concrete dimensions of one elastic width."""

    width: float
    hidden: int  # residual-stream channels
    heads: int  # query heads
    kv_heads: int  # key/value heads (GQA)
    head_dim: int
    ffn_outer: int  # FFN hidden channels in down/up blocks
    ffn_middle: int  # FFN hidden channels in middle blocks

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class PlannedBlock:
    """One transformer block of the architecture, in the flat order down, middle, up."""

    position: int
    stage: str  # down, middle or up
    index: int  # within its stage
    sparse: bool  # adaptive sparse self-attention (ASSA): the outer stages of an `assa` config
    reads_skip: bool  # fuses a U-ViT long skip (the last half of the middle stage)
    writes_skip: bool  # its output is a long skip a later middle block reads (the first half)

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.index}"


@dataclass(frozen=True)
class BlockPlan:
    """The walk every model of a config takes (the reference EfficientDiT, the deploy graph, its chunks): the
    blocks in order, and where the hourglass stage transitions run. A transition at position p runs before block
    p; at len(blocks), after the last block."""

    blocks: tuple[PlannedBlock, ...]
    downsample_at: int | None  # the down stage's output is saved, and the map downsampled, before this block
    upsample_at: int | None  # the map is upsampled and the saved down-stage output added back, before this block
    n_skips: int  # U-ViT long skips of the middle stage (a stack: the innermost first)

    def __len__(self) -> int:
        return len(self.blocks)

    def transitions_before(self, position: int) -> tuple[bool, bool]:
        """(downsample, upsample) before block `position` (or after the last, at len(self))."""
        return position == self.downsample_at, position == self.upsample_at


@dataclass(frozen=True)
class ModelConfig:
    """An elastic three-stage efficient DiT (SnapGen++ §3.1-3.2)."""

    name: str = "toy"
    latent_channels: int = 1
    patch_size: int = 1
    sample_size: tuple[int, int] = (8, 8)  # default latent (H, W); any compatible size works at export
    hidden_dim: int = 96
    head_dim: int = 6
    num_heads: int = 16
    num_kv_heads: int = 8
    text_dim: int = 32
    text_len: int = 4
    depth_down: int = 2
    depth_middle: int = 4
    depth_up: int = 3
    ffn_ratio: float = 4.0  # down/up blocks
    ffn_ratio_middle: float = 3.0
    down_up_attention: str = "assa"  # "full" rebuilds ablation (B) of Fig. 3
    stage_downsample: bool = True  # False: one stage at full token resolution (ablation A, plain DiT)
    middle_skips: bool = True  # U-ViT dense long skips in the middle stage
    kv_compression: int = 2  # stride of the depthwise conv compressing k and v (eq. 1)
    bna_blocks: int = 16
    bna_radius: int = 1
    bna_tiling: str = "grid"  # "grid": B blocks tile the 2-D token grid; "sequence": the flat sequence (eq. 2)
    widths: tuple[float, ...] = (0.375, 0.5, 1.0)
    frequency_dim: int = 256  # sinusoidal timestep features
    # Options for imported families (model/importers); the defaults are SnapGen++'s.
    prediction: str = "flow"  # PREDICTIONS
    train_timesteps: int = 1000  # "epsilon": the DDPM schedule, linear betas from beta_start to beta_end
    beta_start: float = 0.0001
    beta_end: float = 0.02
    cross_attention_norm: bool = True  # LayerNorm before cross-attention (PixArt has none)
    caption_projection: bool = False  # text_dim -> hidden MLP inside the denoiser (PixArt's caption_projection)
    micro_conditions: bool = False  # PixArt-alpha's resolution and aspect-ratio embeddings (fixed per latent size)
    # a text attention-mask input: padding tokens get -10000 added to their cross-attention scores, as diffusers'
    # PixArt pipelines mask them (the packages take a `text_attention_mask` input)
    text_mask: bool = False
    vae_scale_factor: int = 8  # pixels per latent cell (the resolution micro-condition)
    position_table: str = "sincos"  # POSITION_TABLES
    position_base_size: int = 0  # "pixart": the grid side positions are scaled to (0: the token grid itself)
    position_interpolation_scale: float = 1.0

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "sample_size", tuple(int(s) for s in self.sample_size))
        object.__setattr__(self, "widths", tuple(sorted(float(w) for w in self.widths)))
        self.validate()

    # ---- validation -------------------------------------------------------------------------------
    def _check_types(self) -> None:
        """Each field of its declared kind (YAML gives '1e9' as text and 6.5 as a float), finite, and within
        FIELD_LIMITS, before anything is derived from it or allocated for it."""
        where = f"config {self.name!r}" if isinstance(self.name, str) else "config"
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if kind == "int":
                ok = _is_whole(v)
            elif kind == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            elif kind == "bool":
                ok = isinstance(v, bool)
            elif kind == "str":
                ok = isinstance(v, str) and 0 < len(v) <= 200
            elif kind.startswith("tuple[int"):
                ok = isinstance(v, (list, tuple)) and all(_is_whole(x) for x in v)
            else:  # tuple[float, ...]
                ok = isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            if not ok:
                raise EdgeCompileError(f"{where}: {f.name} must be {KIND_TEXT[kind]}, got {v!r}")
            limit = FIELD_LIMITS.get(f.name)
            if limit is not None and not isinstance(v, (list, tuple, str)) and v > limit:
                raise EdgeCompileError(f"{where}: {f.name} = {v} is beyond the {limit} edgecompile supports")
        for name, limit in (("sample_size", MAX_LATENT_SIDE),):
            if any(int(x) > limit for x in getattr(self, name)):
                raise EdgeCompileError(f"{where}: {name} {list(getattr(self, name))} has a side beyond {limit}")
        depth = self.depth_down + self.depth_middle + self.depth_up
        if depth > MAX_BLOCKS:
            raise EdgeCompileError(f"{where}: {depth} blocks in all is beyond the {MAX_BLOCKS} edgecompile supports")

    def validate(self) -> None:
        positive = [
            "latent_channels", "patch_size", "hidden_dim", "head_dim", "num_heads", "num_kv_heads",
            "text_dim", "text_len", "bna_blocks", "kv_compression", "frequency_dim",
        ]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise EdgeCompileError(f"config {self.name!r}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("depth_down", "depth_middle", "depth_up", "bna_radius"):
            if int(getattr(self, name)) < 0:
                raise EdgeCompileError(f"config {self.name!r}: {name} must be >= 0, got {getattr(self, name)}")
        if self.depth_down + self.depth_middle + self.depth_up == 0:
            raise EdgeCompileError(f"config {self.name!r}: the model needs at least one block")
        if self.num_heads % self.num_kv_heads:
            raise EdgeCompileError(
                f"config {self.name!r}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.bna_tiling not in BNA_TILINGS:
            raise EdgeCompileError(f"config {self.name!r}: bna_tiling must be one of {BNA_TILINGS}, got {self.bna_tiling!r}")
        if self.down_up_attention not in DOWN_UP_ATTENTIONS:
            raise EdgeCompileError(
                f"config {self.name!r}: down_up_attention must be one of {DOWN_UP_ATTENTIONS}, got {self.down_up_attention!r}"
            )
        if self.bna_tiling == "grid" and math.isqrt(self.bna_blocks) ** 2 != self.bna_blocks:
            raise EdgeCompileError(
                f"config {self.name!r}: grid BNA tiles the token grid into sqrt(B) x sqrt(B) blocks, so bna_blocks "
                f"must be a perfect square, got {self.bna_blocks}"
            )
        if self.prediction not in PREDICTIONS:
            raise EdgeCompileError(f"config {self.name!r}: prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.position_table not in POSITION_TABLES:
            raise EdgeCompileError(f"config {self.name!r}: position_table must be one of {POSITION_TABLES}, got {self.position_table!r}")
        if self.train_timesteps < 2 or not 0 < self.beta_start < self.beta_end < 1:
            raise EdgeCompileError(f"config {self.name!r}: the DDPM schedule needs train_timesteps >= 2 and 0 < beta_start < beta_end < 1")
        if self.position_base_size < 0 or self.position_interpolation_scale <= 0 or self.vae_scale_factor < 1:
            raise EdgeCompileError(f"config {self.name!r}: position_base_size >= 0, position_interpolation_scale > 0 and "
                                   "vae_scale_factor >= 1 are required")
        if (self.caption_projection or self.micro_conditions) and self.widths != (1.0,):
            raise EdgeCompileError(f"config {self.name!r}: caption_projection and micro_conditions are options of imported "
                                   "single-width models: set widths to [1.0]")
        if self.micro_conditions and self.hidden_dim % 3:
            raise EdgeCompileError(f"config {self.name!r}: micro_conditions split hidden_dim in thirds: {self.hidden_dim} is not a multiple of 3")
        if self.ffn_ratio <= 0 or self.ffn_ratio_middle <= 0:
            raise EdgeCompileError(f"config {self.name!r}: ffn_ratio and ffn_ratio_middle must be > 0")
        if len(self.sample_size) != 2:
            raise EdgeCompileError(f"config {self.name!r}: sample_size must be [H, W], got {list(self.sample_size)}")
        if not self.widths or self.widths[-1] != 1.0:
            raise EdgeCompileError(f"config {self.name!r}: widths must include 1.0 (the supernetwork), got {list(self.widths)}")
        for w in self.widths:
            self.dims(w)
        self.check_latent_size(*self.sample_size)

    def dims(self, width: float = 1.0) -> WidthDims:
        """Dimensions at `width`; a clear error when a dimension would not be whole."""
        width = float(width)
        if not 0.0 < width <= 1.0:
            raise EdgeCompileError(f"width {width:g} is out of range: a width is a fraction in (0, 1]")
        broken = self._width_problems(width)
        if broken:
            good = ", ".join(width_label(w) for w in self.valid_widths())
            raise EdgeCompileError(
                f"width {width:g} does not divide config {self.name!r} ({'; '.join(broken)}): "
                f"use a width whose dimensions stay whole, e.g. {good}"
            )
        wanted = self._width_values(width)
        return WidthDims(
            width=width,
            hidden=round(wanted["hidden_dim"]),
            heads=round(wanted["num_heads"]),
            kv_heads=round(wanted["num_kv_heads"]),
            head_dim=self.head_dim,
            ffn_outer=round(wanted["FFN hidden (down/up)"]),
            ffn_middle=round(wanted["FFN hidden (middle)"]),
        )

    def _width_values(self, width: float) -> dict[str, float]:
        return {
            "hidden_dim": self.hidden_dim * width,
            "num_heads": self.num_heads * width,
            "num_kv_heads": self.num_kv_heads * width,
            "FFN hidden (down/up)": self.hidden_dim * self.ffn_ratio * width,
            "FFN hidden (middle)": self.hidden_dim * self.ffn_ratio_middle * width,
        }

    def _width_problems(self, width: float) -> list[str]:
        """Dimensions that `width` would make fractional (empty when the width divides the config)."""
        wanted = self._width_values(width)
        broken = [f"{k}={v:g}" for k, v in wanted.items() if abs(v - round(v)) > 1e-9 or round(v) < 1]
        if not broken and round(wanted["hidden_dim"]) % 4:
            broken.append(f"hidden_dim={round(wanted['hidden_dim'])} (2-D sin-cos positions need a multiple of 4)")
        return broken

    @property
    def default_width(self) -> float:
        """The width commands use when none is given: 0.5 (SnapGen++'s 0.4B) if trained, else the largest."""
        return 0.5 if 0.5 in self.widths else self.widths[-1]

    def check_trained_width(self, width: float, option: str = "--width") -> None:
        """A checkpoint holds the per-width parameters of its config's widths only."""
        self.dims(width)
        if float(width) not in self.widths:
            raise EdgeCompileError(f"{option} {width:g}: config {self.name!r} was trained at widths "
                                   f"{', '.join(width_label(w) for w in self.widths)} only: pick one of them")

    def parse_widths(self, text: str, option: str = "--width") -> list[float]:
        """'all', one width or a comma list (each width once, in the order given), every one checked."""
        if text.strip() == "all":
            return list(self.widths)
        try:
            widths = [float(v) for v in text.split(",")]
        except ValueError:
            raise EdgeCompileError(f"{option} {text!r} is not a number, a comma list or 'all' (e.g. {option} 0.5)") from None
        for w in widths:
            if not math.isfinite(w):
                raise EdgeCompileError(f"{option} {text!r} is not a number, a comma list or 'all' (e.g. {option} 0.5)")
            self.dims(w)
        if len(set(widths)) != len(widths):
            raise EdgeCompileError(f"{option} {text!r} names a width twice: name each once")
        return widths

    def valid_widths(self) -> list[float]:
        """Widths k/num_heads that divide every dimension (for error messages and `info`)."""
        return [k / self.num_heads for k in range(1, self.num_heads + 1) if not self._width_problems(k / self.num_heads)]

    @property
    def max_timestep(self) -> float:
        """The timestep of pure noise: 1 for flow models, train_timesteps - 1 for DDPM ones."""
        return 1.0 if self.prediction == "flow" else float(self.train_timesteps - 1)

    # ---- token grids -------------------------------------------------------------------------------
    def block_plan(self) -> BlockPlan:
        """The architecture's block walk: which blocks are sparse, which read and write long skips, and where the
        stage transitions run. The one place these are decided (model/dit.py and deploy/dit.py build and walk it)."""
        n_skip = self.depth_middle // 2 if self.middle_skips else 0
        sparse_outer = self.down_up_attention == "assa"
        blocks, pos = [], 0
        for stage, depth in (("down", self.depth_down), ("middle", self.depth_middle), ("up", self.depth_up)):
            for i in range(depth):
                middle = stage == "middle"
                blocks.append(PlannedBlock(position=pos, stage=stage, index=i, sparse=sparse_outer and not middle,
                                           reads_skip=middle and i >= self.depth_middle - n_skip, writes_skip=middle and i < n_skip))
                pos += 1
        return BlockPlan(blocks=tuple(blocks), downsample_at=self.depth_down if self.stage_downsample else None,
                         upsample_at=self.depth_down + self.depth_middle if self.stage_downsample else None, n_skips=n_skip)

    def token_grid(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        return latent_h // self.patch_size, latent_w // self.patch_size

    def middle_grid(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        h, w = self.token_grid(latent_h, latent_w)
        return (h // 2, w // 2) if self.stage_downsample else (h, w)

    def bna_block_grid(self, h: int, w: int) -> tuple[int, int]:
        """(rows, cols) of BNA blocks on an h x w token grid in grid tiling."""
        side = math.isqrt(self.bna_blocks)
        return side, side

    def latent_size_problem(self, latent_h: int, latent_w: int) -> str | None:
        """Why a latent of this size cannot run through the model (reference and deploy graph alike), or None.
        The one place the latent-size rules live: `info`, `init`, calibration and every export check through it."""
        p = self.patch_size
        if max(latent_h, latent_w) > MAX_LATENT_SIDE:
            return f"a side beyond {MAX_LATENT_SIDE} is not supported ({MAX_LATENT_SIDE}x{MAX_LATENT_SIDE} is an 8192-pixel image)"
        if latent_h < 1 or latent_w < 1 or latent_h % p or latent_w % p:
            return f"H and W must be positive multiples of patch_size {p}"
        h, w = self.token_grid(latent_h, latent_w)
        needs_even = self.stage_downsample or (self.down_up_attention == "assa" and self.depth_down + self.depth_up > 0)
        if needs_even:
            s = self.kv_compression if self.down_up_attention == "assa" else 1
            m = 2 * s // math.gcd(2, s) if self.stage_downsample else s
            if h % m or w % m:
                return f"the {h}x{w} token grid must be divisible by {m} (2x2 downsample / KV compression)"
        if self.down_up_attention == "assa" and self.depth_down + self.depth_up > 0:
            if self.bna_tiling == "grid":
                rows, cols = self.bna_block_grid(h, w)
                if h % rows or w % cols:
                    return f"grid BNA splits the {h}x{w} token grid into {rows}x{cols} blocks, so it must be divisible by {rows}x{cols}"
            elif (h * w) % self.bna_blocks:
                return f"sequence BNA splits {h * w} tokens into {self.bna_blocks} blocks, so the token count must be divisible by it"
        return None

    def nearby_latent_sizes(self, latent_h: int, latent_w: int, count: int = 3) -> list[tuple[int, int]]:
        """The `count` valid latent sizes closest to (latent_h, latent_w), for error messages."""
        p, reach = self.patch_size, 8 * self.patch_size * max(2, self.kv_compression) * math.isqrt(max(1, self.bna_blocks))
        around = lambda v: range(max(p, v - reach) // p * p, min(MAX_LATENT_SIDE, v + reach) + 1, p)  # noqa: E731
        ok = [(hh, ww) for hh in around(latent_h) for ww in around(latent_w) if self.latent_size_problem(hh, ww) is None]
        return sorted(ok, key=lambda hw: (abs(hw[0] - latent_h) + abs(hw[1] - latent_w), hw))[:count]

    def check_latent_size(self, latent_h: int, latent_w: int) -> None:
        """Raise a one-line error naming sizes that work when a latent of this size cannot run through the model."""
        problem = self.latent_size_problem(latent_h, latent_w)
        if problem is None:
            return
        near = self.nearby_latent_sizes(latent_h, latent_w)
        hint = f"; sizes that work nearby: {', '.join(f'{a}x{b}' for a, b in near)}" if near else ""
        raise EdgeCompileError(f"latent {latent_h}x{latent_w} for config {self.name!r}: {problem}{hint}")

    # ---- I/O ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sample_size"] = list(self.sample_size)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise EdgeCompileError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EdgeCompileError(f"{source}: unknown config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except EdgeCompileError:
            raise
        except (TypeError, ValueError) as e:
            raise EdgeCompileError(f"{source}: invalid config ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = find_config(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
            raise EdgeCompileError(f"config file {path} could not be parsed: {str(e).splitlines()[0]}") from None
        if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Shipped as package data (configs, device profiles, ablation models), so a regular install runs every command;
# the repository's top-level recipes/ is a link to it.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "recipes"  # installed with the package (package-data)
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def shipped_config(name: str | Path) -> Path | None:
    """The config shipped with edgecompile that `name` names: `snapgenpp`, `snapgenpp.yaml` or the source tree's
    `recipes/snapgenpp.yaml`, from any folder (after `pip install` too)."""
    p = Path(name)
    stem = p.stem if p.suffix in CONFIG_SUFFIXES else p.name
    if p.parent not in (Path("."), Path("recipes")) or not stem:
        return None
    found = SHIPPED_CONFIGS / f"{stem}.yaml"
    return found if found.is_file() else None


def find_config(name: str | Path) -> Path:
    """A config file: the path itself when it is a file, else the shipped config of that name; else a one-line
    error saying what was looked for."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_config(name)
    if shipped is not None:
        return shipped
    raise EdgeCompileError(f"config {name} not found: looked for the file {path} and for a config shipped with edgecompile; "
                           f"pass a YAML or JSON config file, or one of the shipped names: {', '.join(shipped_config_names())}")

"""Calibration inputs: what the denoiser actually sees in the app, collected along the unquantized model's own
sampling trajectories (the config's sampler with CFG: rectified-flow Euler, or DDIM for epsilon models), so that sensitivity, allocation and self-distillation
are measured where the package will run.

File format (safetensors; documented in calibration/README.md):
    latent    (N, C, H, W) float32   x_t, the denoiser's latent input
    timestep  (N,)         float32   t in [0, 1] (1 = pure noise); DDPM steps 0..999 for epsilon models
    text      (N, T, D)    float32   text tokens in training layout (the package takes them as (N, D, 1, T))
    metadata  {"format": "edgecompile-calibration", "format_version": "1", "width", "schedules", "seed",
               "cfg_scale", "prompts", "config"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgecompile.atomic import atomic_path, check_output_path
from edgecompile.deploy.contract import text_to_package
from edgecompile.errors import EdgeCompileError
from edgecompile.model.budget import check_fits
from edgecompile.model.config import ModelConfig
from edgecompile.model.device import device_of, resolve_device
from edgecompile.model.elastic import WIDTH_SUFFIX, extract_width
from edgecompile.model.sampling import sample

FORMAT = "edgecompile-calibration"
FORMAT_VERSION = "1"
DEFAULT_SCHEDULES = (4, 20)  # the app's 4-step schedule and a longer one
LONG_SCHEDULE_STRIDE = 4  # of a long schedule keep every 4th step: its neighbours are nearly the same input


@dataclass
class CalibrationSet:
    latent: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.timestep)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """The latent size the inputs were recorded at."""
        return tuple(int(v) for v in self.latent.shape[2:])

    def batches(self, batch_size: int = 64, device: torch.device | str = "cpu"):
        """(latent, t, text in package layout (B, D, 1, T)) batches, in order, moved to `device` one at a time."""
        for s in range(0, len(self), batch_size):
            e = s + batch_size
            yield (self.latent[s:e].to(device), self.timestep[s:e].to(device), text_to_package(self.text[s:e]).to(device))

    def spread(self, n: int) -> torch.Tensor:
        """The indices of n inputs spread evenly over the set (every timestep of the schedules stays represented)."""
        if n >= len(self):
            return torch.arange(len(self))
        return torch.linspace(0, len(self) - 1, n).round().long()

    def subset(self, n: int) -> CalibrationSet:
        """n inputs spread evenly over the set (`spread`)."""
        return self if n >= len(self) else self.take(self.spread(n))

    def take(self, idx: torch.Tensor) -> CalibrationSet:
        """The inputs at `idx`, in that order."""
        return CalibrationSet(self.latent[idx], self.timestep[idx], self.text[idx], {**self.meta, "subset_of": len(self)})

    def split(self, fraction: float = 0.2, seed: int = 0) -> tuple[CalibrationSet, CalibrationSet | None]:
        """(the rest, a seeded random `fraction` held out); nothing is held out of a set of 4 inputs or fewer."""
        if len(self) <= 4:
            return self, None
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_hold = max(1, int(len(self) * fraction))
        part = lambda idx: CalibrationSet(self.latent[idx], self.timestep[idx], self.text[idx], dict(self.meta))  # noqa: E731
        return part(perm[n_hold:].sort().values), part(perm[:n_hold].sort().values)

    def check(self, config: ModelConfig, latent_hw: tuple[int, int] | None = None, source: str = "calibration set") -> None:
        """Shapes that fit the model, at least one input, a latent size the model runs at, finite values."""
        want = (config.latent_channels, *(latent_hw or self.latent_hw))
        if len(self.timestep) == 0 or len(self.latent) == 0:
            raise EdgeCompileError(f"{source} holds no inputs: build one with `edgecompile calibrate`")
        problems = []
        if self.latent.ndim != 4 or tuple(self.latent.shape[1:]) != want:
            problems.append(f"latent is {tuple(self.latent.shape)}, expected (N, {', '.join(map(str, want))})")
        if self.text.ndim != 3 or self.text.shape[1:] != (config.text_len, config.text_dim):
            problems.append(f"text is {tuple(self.text.shape)}, expected (N, {config.text_len}, {config.text_dim})")
        if self.timestep.shape != (len(self.latent),):
            problems.append(f"timestep is {tuple(self.timestep.shape)}, expected ({len(self.latent)},)")
        if problems:
            raise EdgeCompileError(f"{source} does not fit model {config.name!r}: " + "; ".join(problems))
        config.check_latent_size(*self.latent_hw)
        check_finite(self, source)

    def save(self, path: str | Path, force: bool = False, inputs=()) -> Path:
        path = Path(path)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **{k: json.dumps(v) for k, v in self.meta.items()}}
        with atomic_path(path, force=force, is_dir=False, inputs=inputs) as tmp:
            save_file({"latent": self.latent.contiguous(), "timestep": self.timestep.contiguous(), "text": self.text.contiguous()},
                      str(tmp), metadata=meta)
        return path


def check_calibration_width(calib: CalibrationSet, width: float, source: str) -> None:
    """A calibration set records one width's trajectories: another width would be calibrated on the wrong inputs."""
    want = calib.meta.get("width")
    if want is not None and abs(float(want) - width) > 1e-9:
        raise EdgeCompileError(f"{source} was recorded at width {float(want):g}, not {width:g}: pass --width {float(want):g} "
                               "or calibrate this width")


def check_finite(calib: CalibrationSet, source: str = "calibration set") -> None:
    """NaN or infinite inputs (e.g. from --cfg nan) would poison the sweep and the distillation: refuse them."""
    for name in ("latent", "timestep", "text"):
        t = getattr(calib, name)
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise EdgeCompileError(f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s) of {t.numel()}: rebuild it with `edgecompile calibrate`")


def load_calibration(path: str | Path) -> CalibrationSet:
    path = Path(path)
    if not path.is_file():
        raise EdgeCompileError(f"calibration file {path} not found: build one with `edgecompile calibrate`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise EdgeCompileError(f"calibration file {path} is not an {FORMAT} file (metadata 'format' is {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k).float() for k in ("latent", "timestep", "text")}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise EdgeCompileError(f"calibration file {path} is corrupt or lacks latent/timestep/text ({str(e).splitlines()[0]})") from None
    try:
        extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "format_version")}
    except json.JSONDecodeError as e:
        raise EdgeCompileError(f"calibration file {path} has corrupt metadata ({e})") from None
    return CalibrationSet(**tensors, meta=extra)


def random_prompts(config: ModelConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in text embeddings for checkpoints that ship none (random-initialised scale tests): N(0, 1)."""
    g = torch.Generator().manual_seed(seed + 7919)
    tokens = torch.randn((n, config.text_len, config.text_dim), generator=g)
    return tokens, torch.zeros((1, config.text_len, config.text_dim))


@torch.no_grad()
def build_calibration(model, width: float, tokens: torch.Tensor, null: torch.Tensor | None, latent_hw: tuple[int, int],
                      schedules: tuple[int, ...] = DEFAULT_SCHEDULES, seed: int = 0, cfg_scale: float = 2.0,
                      prompts_label: str = "checkpoint", progress: Callable[[str, int, int], None] | None = None) -> CalibrationSet:
    """Run the unquantized width's sampler on every prompt for each schedule and record every denoiser input.

    With CFG the app runs the denoiser on the prompt and on the null text at each step: both are recorded.
    Long schedules are thinned to every LONG_SCHEDULE_STRIDE-th step. Deterministic for a given seed, and the
    same noise on every device. `model` is the supernetwork or the width already extracted (which then runs at
    its full width), on the device that runs the sampler; the recorded set is on the CPU.
    """

    config = model.config
    device = device_of(model)
    forward_width = 1.0 if config.widths == (1.0,) else width  # an extracted width is a dense model
    tokens, null = tokens.to(device), null.to(device) if null is not None else None
    use_cfg = cfg_scale != 1.0 and null is not None
    latents, times, texts = [], [], []
    total, done = sum(schedules), [0]
    for steps in schedules:
        keep = 1 if steps <= 8 else LONG_SCHEDULE_STRIDE
        step_index = [0]

        def record(x, t, text, keep=keep, step_index=step_index):
            if step_index[0] % keep == 0:  # recorded on the CPU: a calibration set outlives the stage
                latents.append(x.to("cpu", copy=True))
                times.append(t.to("cpu", copy=True))
                texts.append(text.to("cpu", copy=True))
                if use_cfg:
                    latents.append(x.to("cpu", copy=True))
                    times.append(t.to("cpu", copy=True))
                    texts.append(null.expand_as(text).to("cpu", copy=True))
            step_index[0] += 1
            done[0] += 1
            if progress:
                progress("sampling trajectories", done[0], total)

        g = torch.Generator().manual_seed(seed * 1000 + steps)
        noise = torch.randn((len(tokens), config.latent_channels, *latent_hw), generator=g).to(device)  # same noise on every device
        sample(config, lambda x, t, c: model(x, t, c, width=forward_width), noise, tokens, steps=steps,
               cfg_scale=cfg_scale if use_cfg else 1.0, null_text=null, on_step=record)
    meta = {"width": width, "latent": list(latent_hw), "schedules": list(schedules), "seed": seed, "cfg_scale": cfg_scale if use_cfg else 1.0,
            "prompts": f"{prompts_label} ({len(tokens)})", "config": config.name.split(WIDTH_SUFFIX)[0]}  # the checkpoint's config
    return CalibrationSet(torch.cat(latents), torch.cat(times), torch.cat(texts), meta)


def default_calibration(ckpt, width: float, latent_hw: tuple[int, int] | None = None, seed: int = 0,
                        schedules: tuple[int, ...] = DEFAULT_SCHEDULES, n_random_prompts: int = 4,
                        device: torch.device | str = "cpu", progress: Callable[[str, int, int], None] | None = None,
                        cfg_scale: float | None = None) -> CalibrationSet:
    """The deterministic calibration set edgecompile builds when none is given: the checkpoint's own prompts
    (random stand-ins when it ships none), seeded noise, both schedules, sampled by the width on `device` with the
    app's guidance `cfg_scale` (build_calibration's default when None)."""
    config = ckpt.config
    latent_hw = tuple(latent_hw or config.sample_size)
    if ckpt.prompts is not None:
        tokens, null, label = ckpt.prompts.tokens, ckpt.prompts.null, "checkpoint prompts"
    else:
        tokens, null = random_prompts(config, n_random_prompts, seed)
        label = "random N(0,1) text embeddings"
    guidance = {} if cfg_scale is None else {"cfg_scale": cfg_scale}
    return build_calibration(sampler_model(ckpt, width, device), width, tokens, null, latent_hw, schedules, seed, prompts_label=label,
                             progress=progress, **guidance)


def sampler_model(ckpt, width: float, device: torch.device | str = "cpu"):
    """The width, extracted (views of the checkpoint on the CPU, a copy on an accelerator), on `device`."""
    return extract_width(ckpt.model, width, share=True).to(device)


MAX_PROMPTS = 1024  # prompts in one file (calibration and sample): each is sampled along whole trajectories


def load_user_prompts(path: str | Path, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A user's text embeddings: safetensors with "tokens" (N, T, D) and optional "null" (1, T, D)."""
    path = Path(path)
    if not path.is_file():
        raise EdgeCompileError(f"prompts file {path} not found: a safetensors file with 'tokens' (N, T, D) and optionally 'null'")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            tokens = f.get_tensor("tokens").float()
            null = f.get_tensor("null").float() if "null" in keys else None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise EdgeCompileError(f"prompts file {path} is corrupt or has no 'tokens' tensor ({str(e).splitlines()[0]})") from None
    if tokens.ndim != 3 or tokens.shape[1:] != (config.text_len, config.text_dim) or len(tokens) == 0:
        raise EdgeCompileError(f"prompts file {path}: tokens are {tuple(tokens.shape)}, expected (N >= 1, {config.text_len}, {config.text_dim})")
    if len(tokens) > MAX_PROMPTS:
        raise EdgeCompileError(f"prompts file {path} holds {len(tokens)} prompts; edgecompile takes at most {MAX_PROMPTS}: split the file")
    if null is not None:
        if null.numel() != tokens[0].numel() or null.ndim not in (2, 3) or tuple(null.shape[-2:]) != tuple(tokens.shape[1:]):
            raise EdgeCompileError(f"prompts file {path}: 'null' is {tuple(null.shape)}, expected (1, {config.text_len}, {config.text_dim}) "
                                   "like one prompt of 'tokens' (the empty prompt's embedding at the same text length)")
        null = null.reshape(1, *tokens.shape[1:])
    for name, t in (("tokens", tokens), ("null", null)):
        if t is not None and not torch.isfinite(t).all():
            raise EdgeCompileError(f"prompts file {path}: tensor {name!r} holds NaN or infinite values")
    return tokens, null


def record_calibration(ckpt, width: float, output: str | Path, prompts: str | Path | None = None,
                       schedules: tuple[int, ...] = DEFAULT_SCHEDULES, latent_hw: tuple[int, int] | None = None, seed: int = 0,
                       cfg_scale: float = 2.0, force: bool = False, device: str = "cpu") -> CalibrationSet:
    """`edgecompile calibrate`: every option checked first, then the trajectories recorded and saved."""
    ckpt.config.check_trained_width(width)
    check_output_path(Path(output), force, inputs=[ckpt.path, prompts])
    if not schedules or min(schedules) < 1:
        raise EdgeCompileError(f"--schedules {list(schedules)}: give step counts >= 1 (e.g. 4,20)")
    hw = tuple(latent_hw or ckpt.config.sample_size)
    ckpt.config.check_latent_size(*hw)
    check_fits(ckpt.config, width, hw, what=f"--latent {hw[0]}x{hw[1]}")
    torch_device = resolve_device(device)
    if prompts:
        tokens, null = load_user_prompts(prompts, ckpt.config)
        calib = build_calibration(sampler_model(ckpt, width, torch_device), width, tokens, null, hw, schedules, seed, cfg_scale,
                                  prompts_label=str(prompts))
    else:
        calib = default_calibration(ckpt, width, hw, seed, schedules, device=torch_device, cfg_scale=cfg_scale)
    check_finite(calib, "the recorded calibration set")
    calib.save(output, force=force, inputs=[ckpt.path, prompts])
    return calib

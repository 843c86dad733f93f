"""The samplers an app runs the denoiser in, one per prediction type (ModelConfig.prediction):

- "flow": rectified flow, x_t = (1 - t) x_0 + t eps, v = eps - x_0 (eq. 4); Euler from t = 1 to t = 0.
- "epsilon": DDPM noise prediction with linear betas (PixArt); deterministic DDIM (eta = 0) on diffusers'
  "leading" timestep spacing, as `DDIMScheduler(clip_sample=False, set_alpha_to_one=True)` steps it
  (tests/test_pixart.py checks it against diffusers).

Both call `on_step(x, t, text)` with every denoiser input, which is how calibration records trajectories.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, text) -> v or eps
OnStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def timesteps(steps: int) -> torch.Tensor:
    """steps+1 times from 1 (noise) to 0 (data), uniform."""
    return torch.linspace(1.0, 0.0, steps + 1)


def guided(denoiser: Denoiser, x, t, text, cfg_scale: float, null_text: torch.Tensor | None, masks=None) -> torch.Tensor:
    """One guided prediction; `masks` (text mask, null mask), each (B, T), go to a denoiser that takes a text mask
    as a fourth argument (None: the denoiser takes three)."""
    cond_mask, null_mask = masks if masks is not None else (None, None)
    out = denoiser(x, t, text) if cond_mask is None else denoiser(x, t, text, cond_mask)
    if cfg_scale == 1.0:
        return out
    if null_text is None:
        raise ValueError("classifier-free guidance needs null_text")
    null = null_text.expand_as(text)
    uncond = denoiser(x, t, null) if null_mask is None else denoiser(x, t, null, null_mask.expand_as(cond_mask))
    return uncond + cfg_scale * (out - uncond)


@torch.no_grad()
def euler_sample(denoiser: Denoiser, noise: torch.Tensor, text: torch.Tensor, steps: int = 20, cfg_scale: float = 1.0,
                 null_text: torch.Tensor | None = None, on_step: OnStep | None = None, masks=None) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 to 0."""
    x = noise
    ts = timesteps(steps)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        if on_step is not None:
            on_step(x, t, text)
        x = x + (ts[i + 1] - ts[i]) * guided(denoiser, x, t, text, cfg_scale, null_text, masks)
    return x


def alphas_cumprod(train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's linear beta schedule, cumulative alphas (float64, as diffusers keeps them in float32 from float32 betas)."""
    betas = torch.linspace(beta_start, beta_end, train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int, train_timesteps: int) -> torch.Tensor:
    """diffusers' "leading" spacing: 0, r, 2r, ... (r = train_timesteps // steps), from the noisiest."""
    ratio = train_timesteps // steps
    return (torch.arange(steps) * ratio).flip(0)


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, noise: torch.Tensor, text: torch.Tensor, steps: int, train_timesteps: int = 1000,
                beta_start: float = 0.0001, beta_end: float = 0.02, cfg_scale: float = 1.0,
                null_text: torch.Tensor | None = None, on_step: OnStep | None = None, masks=None) -> torch.Tensor:
    """Deterministic DDIM with an epsilon-predicting denoiser; timesteps passed as floats in DDPM steps."""
    acp = alphas_cumprod(train_timesteps, beta_start, beta_end).to(noise.device)
    ts = ddim_timesteps(steps, train_timesteps)
    ratio = train_timesteps // steps
    x = noise
    for t in ts.tolist():
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        if on_step is not None:
            on_step(x, tt, text)
        eps = guided(denoiser, x, tt, text, cfg_scale, null_text, masks)
        a_t = acp[t]
        a_prev = acp[t - ratio] if t - ratio >= 0 else torch.ones((), device=x.device)  # set_alpha_to_one
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def sample(config, denoiser: Denoiser, noise: torch.Tensor, text: torch.Tensor, steps: int, cfg_scale: float = 1.0,
           null_text: torch.Tensor | None = None, on_step: OnStep | None = None, masks=None) -> torch.Tensor:
    """The sampler of `config.prediction`; `masks` = (text mask (B, T), null mask (1, T)) for masked denoisers."""
    if config.prediction == "epsilon":
        return ddim_sample(denoiser, noise, text, steps, config.train_timesteps, config.beta_start, config.beta_end, cfg_scale,
                           null_text, on_step, masks)
    return euler_sample(denoiser, noise, text, steps, cfg_scale, null_text, on_step, masks)

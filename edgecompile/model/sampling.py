"""Rectified-flow sampling: x_t = (1 - t) x_0 + t eps, v = eps - x_0 (eq. 4); Euler from t=1 to t=0."""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, text) -> v


def timesteps(steps: int) -> torch.Tensor:
    """steps+1 times from 1 (noise) to 0 (data), uniform."""
    return torch.linspace(1.0, 0.0, steps + 1)


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser, noise: torch.Tensor, text: torch.Tensor, steps: int = 20,
    cfg_scale: float = 1.0, null_text: torch.Tensor | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 to 0. `on_step(x_t, t, text)` sees every denoiser input (calibration)."""
    x = noise
    ts = timesteps(steps)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        if on_step is not None:
            on_step(x, t, text)
        v = denoiser(x, t, text)
        if cfg_scale != 1.0:
            if null_text is None:
                raise ValueError("classifier-free guidance needs null_text")
            v_uncond = denoiser(x, t, null_text.expand_as(text))
            v = v_uncond + cfg_scale * (v - v_uncond)
        x = x + (ts[i + 1] - ts[i]) * v
    return x

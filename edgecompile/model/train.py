"""Elastic training (§3.2): flow matching on the supernetwork and a sampled sub-width every step, plus the
distillation loss of eq. 5 from the (stop-gradient) supernetwork output to the sub-width."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgecompile.model.dit import EfficientDiT


@dataclass
class TrainSettings:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    distill_weight: float = 1.0
    label_dropout: float = 0.1  # for classifier-free guidance
    seed: int = 0
    time_budget_s: float | None = None


class ClassTokens(nn.Module):
    """Learned conditioning sequence per class (+ a null sequence for CFG): the toy model's 'text encoder'."""

    def __init__(self, n_classes: int, text_len: int, text_dim: int):
        super().__init__()
        self.n_classes = n_classes
        self.table = nn.Parameter(torch.randn(n_classes + 1, text_len, text_dim))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]


def flow_matching_pair(x0: torch.Tensor, generator: torch.Generator):
    """(x_t, t, target velocity eps - x0) with t ~ logit-normal (SD3), which trains few-step sampling well."""
    eps = torch.randn(x0.shape, generator=generator)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * eps, t, eps - x0


@dataclass
class Resolution:
    """One latent size of a multi-resolution run: the data at that size and its batch (the same token count per
    step at every size keeps steps equally costly)."""

    images: torch.Tensor  # (N, C, H, W)
    batch_size: int


def train_elastic(model: EfficientDiT, tokens: ClassTokens, images: torch.Tensor | list[Resolution], labels: torch.Tensor,
                  s: TrainSettings, log=print) -> tuple[EfficientDiT, ClassTokens, dict]:
    """Train in place; return EMA copies of the model and the class tokens, and a log of losses. `images` is one
    tensor (batch s.batch_size) or a list of Resolutions that the steps take in turn."""
    sizes = images if isinstance(images, list) else [Resolution(images, s.batch_size)]
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    params = list(model.parameters()) + list(tokens.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / s.warmup) * 0.5 * (1 + math.cos(math.pi * min(i, s.steps) / s.steps)) * 0.9 + 0.1
    )
    ema_model, ema_tokens = copy.deepcopy(model).eval(), copy.deepcopy(tokens)
    sub_widths = [w for w in model.config.widths if w != 1.0]
    history = {"step": [], "loss_full": [], "loss_sub": [], "loss_dist": []}
    start = time.time()
    model.train()
    step = 0
    for step in range(s.steps):
        res = sizes[step % len(sizes)]
        idx = torch.randint(0, len(res.images), (res.batch_size,), generator=gen)
        x0, y = res.images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < s.label_dropout] = tokens.n_classes  # null class
        text = tokens(y)
        x_t, t, target = flow_matching_pair(x0, gen)
        v_full = model(x_t, t, text, width=1.0)
        loss_full = F.mse_loss(v_full, target)
        loss = loss_full
        loss_sub = loss_dist = torch.zeros(())
        if sub_widths:
            w = sub_widths[(step // len(sizes)) % len(sub_widths)]  # every sub-width in turn, at every size
            v_sub = model(x_t, t, text, width=w)
            loss_sub = F.mse_loss(v_sub, target)
            loss_dist = F.mse_loss(v_sub, v_full.detach())  # eq. 5, stop-gradient teacher
            loss = loss + loss_sub + s.distill_weight * loss_dist
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(s.ema_decay, (1 + step) / (10 + step))
            for ema, cur in ((ema_model, model), (ema_tokens, tokens)):
                for pe, pc in zip(ema.parameters(), cur.parameters()):
                    pe.lerp_(pc, 1 - decay)
        if step % 50 == 0 or step == s.steps - 1:
            history["step"].append(step)
            history["loss_full"].append(loss_full.item())
            history["loss_sub"].append(loss_sub.item())
            history["loss_dist"].append(loss_dist.item())
            log(f"step {step:5d}  full {loss_full.item():.4f}  sub {loss_sub.item():.4f}  dist {loss_dist.item():.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - start:.0f}s")
        if s.time_budget_s is not None and time.time() - start > s.time_budget_s:
            log(f"time budget reached at step {step}")
            break
    history["steps_done"] = step + 1
    history["seconds"] = time.time() - start
    return ema_model, ema_tokens, history

"""Self-distillation after palettization (SnapGen++ supplementary C): freeze the palettized weights and fit the
parameters the package stores at full precision (biases, norm affines, modulation tables) so the student's
output velocity matches the unquantized teacher's on calibration inputs.

Baseline: analytic bias correction, which removes each palettized layer's mean output shift E[dW x] from its bias.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from edgecompile.compress.calibration import CalibrationSet
from edgecompile.compress.palettize_model import palettizable_layers
from edgecompile.compress.sensitivity import calibration_outputs, layer_delta, output_psnr
from edgecompile.deploy.contract import text_to_package
from edgecompile.errors import EdgeCompileError
from edgecompile.model.device import device_of

TRAINABLE_SUFFIXES = (".bias", "_table")  # biases (convs and norm affines) and modulation tables
TRAINABLE_NORM_WEIGHTS = ("norm_cross.weight",)  # the only affine norm scale in the block


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()
            if n.endswith(TRAINABLE_SUFFIXES) or n.endswith(TRAINABLE_NORM_WEIGHTS)]


def replace_parameter(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool = False) -> nn.Parameter:
    """Give the parameter at dotted `name` new storage (never write into it: it may be a view of the checkpoint)."""
    owner_name, _, leaf = name.rpartition(".")
    param = nn.Parameter(value, requires_grad=requires_grad)
    setattr(model.get_submodule(owner_name) if owner_name else model, leaf, param)
    return param


def detach_trainables(model: nn.Module) -> list[nn.Parameter]:
    """Give the trainable parameters storage of their own (deploy parameters may be views of the checkpoint,
    which must not change) and freeze everything else."""
    names = set(trainable_names(model))
    params = []
    for full, p in list(model.named_parameters()):
        if full in names:
            params.append(replace_parameter(model, full, p.detach().clone(), requires_grad=True))
        else:
            p.requires_grad_(False)
    return params


@torch.no_grad()
def bias_correction(student: nn.Module, teacher: nn.Module, calib: CalibrationSet, batch_size: int = 64) -> int:
    """Subtract E[(W_q - W) x] over the calibration inputs (as the teacher sees them) from each palettized
    layer's bias. Returns the number of corrected layers."""
    s_layers, t_layers = palettizable_layers(student), palettizable_layers(teacher)
    names = [n for n in s_layers if s_layers[n].bias is not None and not torch.equal(s_layers[n].weight, t_layers[n].weight)]
    shift = {n: 0.0 for n in names}
    count = {n: 0 for n in names}

    def hook_for(name):
        def hook(mod, inputs, output):
            delta = layer_delta(mod, inputs[0], s_layers[name].weight - mod.weight)
            shift[name] = shift[name] + delta.sum(dim=(0, 2, 3))
            count[name] += delta.shape[0] * delta.shape[2] * delta.shape[3]
        return hook

    handles = [t_layers[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        calibration_outputs(teacher, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    detach_trainables(student)  # own storage before writing
    for n in names:
        s_layers[n].bias.sub_(shift[n] / count[n])
    for p in student.parameters():
        p.requires_grad_(False)
    return len(names)


@dataclass
class DistillSettings:
    steps: int | None = None  # a fixed count (reproducible); None: sized by the time budget
    lr: float = 1e-3
    batch_size: int = 16  # training batch (activations are kept for the backward pass)
    eval_batch_size: int = 64  # teacher outputs and held-out evaluation (no gradients)
    eval_every: int = 25
    # Plateau schedule: after `patience` evaluations without a held-out improvement the learning rate is cut by
    # `lr_decay` and training resumes from the best parameters; after `max_decays` cuts it has converged and stops.
    patience: int = 3
    lr_decay: float = 0.3
    max_decays: int = 3
    seed: int = 0
    holdout_fraction: float = 0.2
    # Sized by time: the number of steps that fit this many seconds at the measured step time (at most
    # MAX_BUDGET_STEPS, early stopping still applies). The step count then depends on the machine's speed.
    # None with steps None: DEFAULT_BUDGET_SECONDS.
    budget_seconds: float | None = None

    def planned_budget(self) -> float | None:
        """The time budget this run is sized by, or None for a fixed step count."""
        if self.steps is not None:
            return None
        return DEFAULT_BUDGET_SECONDS if self.budget_seconds is None else self.budget_seconds

    def validate(self) -> None:
        if self.steps is not None and self.steps < 0:
            raise EdgeCompileError(f"--distill-steps {self.steps} must be >= 0 (0 skips self-distillation)")
        if self.budget_seconds is not None:
            if self.steps is not None:
                raise EdgeCompileError("give --distill-steps or --distill-budget, not both")
            if not (math.isfinite(self.budget_seconds) and self.budget_seconds > 0):
                raise EdgeCompileError(f"--distill-budget {self.budget_seconds / 60:g} must be a positive number of minutes")
        if not (0 < self.lr < 1):
            raise EdgeCompileError(f"distillation learning rate {self.lr} must be in (0, 1)")


MAX_BUDGET_STEPS = 10_000  # the paper self-distils for "several thousand iterations"
# Five minutes per width unless --distill-budget or --distill-steps says otherwise: the step count follows the
# device's speed (thousands of steps where steps are cheap), and the progress line says the plan up front.
DEFAULT_BUDGET_SECONDS = 300.0
BUDGET_PROBE_STEPS = 5  # steps timed (after the first, which pays for warm-up) before the budget sets the count


@dataclass
class DistillResult:
    steps_run: int
    best_step: int
    psnr_before_db: float
    psnr_after_db: float
    holdout_psnr_before_db: float
    holdout_psnr_after_db: float
    seconds: float
    trainable_params: int
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped: str = "steps"  # converged (the plateau schedule ran out), steps (the planned count) or no-steps
    lr_cuts: list[int] = field(default_factory=list)  # the steps at which the learning rate was cut
    planned_steps: int = 0  # the step count chosen before early stopping (--distill-steps, or the time budget)
    step_seconds: float | None = None  # measured per step, evaluations included (budgeted runs)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["history"] = [[s, round(p, 3)] for s, p in self.history]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> DistillResult:
        return cls(**{**data, "history": [(int(s), float(p)) for s, p in data.get("history", [])]})


def distill(student: nn.Module, teacher: nn.Module, calib: CalibrationSet, settings: DistillSettings | None = None,
            progress: Callable[[str, int, int], None] | None = None, holdout: CalibrationSet | None = None) -> DistillResult:
    """Adam on the student's biases, norm affines and modulation tables against the teacher's output velocity.

    `holdout` (default: a seeded `holdout_fraction` of `calib`) picks the parameters kept, those of the best
    held-out PSNR, and drives the plateau schedule (DistillSettings) that stops training once it has converged."""
    settings = settings or DistillSettings()
    settings.validate()
    start = time.perf_counter()
    budget = settings.planned_budget()
    steps = MAX_BUDGET_STEPS if budget is not None else settings.steps
    g = torch.Generator().manual_seed(settings.seed)
    if holdout is None:
        train, hold = calib.split(settings.holdout_fraction, settings.seed)
        hold = hold if hold is not None else train
    else:
        train, hold = calib, holdout
    teacher.eval()
    with torch.no_grad():
        target_train = calibration_outputs(teacher, train, settings.eval_batch_size)
        target_hold = calibration_outputs(teacher, hold, settings.eval_batch_size)
    params = detach_trainables(student)
    n_trainable = sum(p.numel() for p in params)

    def evaluate(which, target) -> float:
        with torch.no_grad():
            return output_psnr(target, calibration_outputs(student, which, settings.eval_batch_size))

    train_eval_start = time.perf_counter()
    before_train = evaluate(train, target_train)
    eval_start = time.perf_counter()
    before_hold = evaluate(hold, target_hold)
    eval_seconds = time.perf_counter() - eval_start
    closing_seconds = time.perf_counter() - train_eval_start  # the closing evaluation costs what the opening one did
    step_seconds, probe_start = None, None
    best = (before_hold, 0, [p.detach().clone() for p in params])
    history = [(0, before_hold)]
    opt = torch.optim.Adam(params, lr=settings.lr)
    bad_evals, step, stopped, lr_cuts = 0, 0, "steps" if steps else "no-steps", []
    text_all = text_to_package(train.text)
    device = device_of(student)  # the training set and teacher outputs stay on the CPU; each batch moves
    while step < steps:
        step += 1
        if step == 1:
            first_start = time.perf_counter()
        if step == 2:
            probe_start = time.perf_counter()
        idx = torch.randint(0, len(train), (min(settings.batch_size, len(train)),), generator=g)
        out = student(train.latent[idx].to(device), train.timestep[idx].to(device), text_all[idx].to(device))
        loss = (out - target_train[idx].to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # The budget holds the whole stage: teacher outputs, evaluations and the closing evaluation included. Steps
        # are timed over BUDGET_PROBE_STEPS after the first (warm-up), unless the first alone says that probing would
        # overrun the budget (a large model on a CPU): then it plans from the first.
        slow_first = step == 1 and (time.perf_counter() - first_start) * (BUDGET_PROBE_STEPS + 1) \
            > budget - (time.perf_counter() - start) - closing_seconds - eval_seconds if budget is not None else False
        if budget is not None and (step == BUDGET_PROBE_STEPS + 1 or slow_first) and step_seconds is None:
            measured = (time.perf_counter() - (first_start if slow_first else probe_start)) / (1 if slow_first else BUDGET_PROBE_STEPS)
            step_seconds = measured + eval_seconds / settings.eval_every
            remaining = budget - (time.perf_counter() - start) - closing_seconds - eval_seconds  # the last step evaluates too
            steps = max(step, min(MAX_BUDGET_STEPS, step + int(remaining / step_seconds)))
            if progress:
                progress(f"self-distillation: {steps} steps of {step_seconds * 1e3:.0f} ms planned", step, steps)
        if step % settings.eval_every == 0 or step == steps:
            p_hold = evaluate(hold, target_hold)
            history.append((step, p_hold))
            if p_hold > best[0] + 1e-3:
                best, bad_evals = (p_hold, step, [p.detach().clone() for p in params]), 0
            else:
                bad_evals += 1
            if progress:
                progress(f"self-distillation (held-out PSNR {p_hold:.2f} dB)", step, steps)
            if bad_evals >= settings.patience:
                if len(lr_cuts) >= settings.max_decays:
                    stopped = "converged"
                    break
                lr_cuts.append(step)
                bad_evals = 0
                with torch.no_grad():  # resume from the best parameters, at a smaller step
                    for p, b in zip(params, best[2]):
                        p.copy_(b)
                for group in opt.param_groups:
                    group["lr"] *= settings.lr_decay
        elif progress and step % 5 == 0:
            progress("self-distillation", step, steps)
    with torch.no_grad():
        for p, b in zip(params, best[2]):
            p.copy_(b)
    for p in params:
        p.requires_grad_(False)
    after_train, after_hold = evaluate(train, target_train), evaluate(hold, target_hold)
    return DistillResult(
        steps_run=step, best_step=best[1], psnr_before_db=round(before_train, 3), psnr_after_db=round(after_train, 3),
        holdout_psnr_before_db=round(before_hold, 3), holdout_psnr_after_db=round(after_hold, 3),
        seconds=round(time.perf_counter() - start, 2), trainable_params=n_trainable, history=history, stopped=stopped, lr_cuts=lr_cuts,
        planned_steps=steps, step_seconds=round(step_seconds, 5) if step_seconds is not None else None,
    )


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The distilled parameters, to save beside the package (the verifier's simulation needs them)."""
    names = set(trainable_names(model))
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if n in names}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    names = set(trainable_names(model))
    unknown = sorted(set(state) - names)
    if unknown:
        raise ValueError(f"distilled state has parameters the model does not train: {unknown[:3]}")
    for full, value in state.items():
        replace_parameter(model, full, value.clone())


"""--device and --calibration-latent. The CPU runs the same code an accelerator does: models and the batch in
flight move with .to(device), calibration sets and teacher outputs stay on the CPU."""

import json

import pytest
import torch

from edgecompile.compress.calibration import build_calibration, default_calibration
from edgecompile.errors import EdgeCompileError
from edgecompile.model import device as device_module
from edgecompile.model.checkpoint import load_checkpoint
from edgecompile.model.device import resolve_device
from tests.test_coreml import run_cli


def test_auto_takes_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(device_module, "available", lambda kind: kind == "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(device_module, "available", lambda kind: kind in ("cpu", "mps"))
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(device_module, "available", lambda kind: True)
    torch.backends.cuda.matmul.allow_tf32 = True
    assert resolve_device("auto") == torch.device("cuda")
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False  # full fp32 on CUDA


def test_an_unavailable_device_is_a_one_line_error(monkeypatch, tiny_checkpoint, tmp_path, capsys):
    monkeypatch.setattr(device_module, "available", lambda kind: kind == "cpu")
    with pytest.raises(EdgeCompileError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--bits", "4", "--device", "mps", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--device mps" in err
    assert not (tmp_path / "o").exists()


def test_the_sampler_runs_the_extracted_width_bit_for_bit(tiny_checkpoint):
    """Calibration samples with the extracted width (what moves to an accelerator): on the CPU it records exactly
    what the supernetwork at that width records."""
    ckpt = load_checkpoint(tiny_checkpoint)
    ours = default_calibration(ckpt, 0.5, seed=3, schedules=(4,))
    from edgecompile.compress.calibration import random_prompts

    tokens, null = random_prompts(ckpt.config, 4, 3)
    supernet = build_calibration(ckpt.model, 0.5, tokens, null, ckpt.config.sample_size, (4,), 3)
    assert torch.equal(ours.latent, supernet.latent) and torch.equal(ours.text, supernet.text)
    assert ours.latent.device.type == "cpu"


def test_compress_small_export_big(tiny_checkpoint, tmp_path, capsys):
    """Calibration, sweep and distillation at 8x8; the package and its verification at 16x16; report.json says so."""
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--width", "1.0", "--bits", "4", "--latent", "16x16",
                            "--calibration-latent", "8x8", "--distill-steps", "10", "--device", "cpu", "-o", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "w1.0" / "report.json").read_text())
    assert report["latent"] == [16, 16] and report["calibration"]["latent"] == [8, 8]
    assert report["calibration"]["device"] == "cpu" and report["verify"]["passed"]


def test_calibration_latent_is_checked_before_work(tiny_checkpoint, tmp_path, capsys):
    for args, message in ((["--calibration-latent", "8x7"], "8x7"), (["--calibration-latent", "axb"], "--calibration-latent"),
                          (["--bits", "16", "--calibration-latent", "8x8"], "applies to palettized")):
        bits = [] if "--bits" in args else ["--bits", "4"]
        code, _, err = run_cli(["export", str(tiny_checkpoint), *bits, *args, "-o", str(tmp_path / "o")], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_batches_are_sized_from_free_memory():
    from edgecompile.model.budget import MAX_BATCH, batch_size_for
    from edgecompile.model.config import ModelConfig

    config = ModelConfig.load("recipes/snapgenpp.yaml")
    assert batch_size_for(config, 1.0, (32, 32), None) == MAX_BATCH  # unknown free memory: the old default
    big, small = batch_size_for(config, 1.0, (128, 128), 80 * 2**30), batch_size_for(config, 1.0, (128, 128), 4 * 2**30)
    assert 1 <= small < big <= MAX_BATCH
    assert batch_size_for(config, 1.0, (128, 128), 1) == 1  # never below one input
    # on the CPU, large activations get no larger batch than they need: 17 at the paper's width 1.0 at 32x32, where
    # one batch of 46 inputs was slower than batches of 16 and held 2.7x the memory; small models keep 64
    assert batch_size_for(config, 1.0, (32, 32), 23 * 2**30) == MAX_BATCH
    assert 8 <= batch_size_for(config, 1.0, (32, 32), 23 * 2**30, on_cpu=True) <= 24
    toy = ModelConfig.load("recipes/toy.yaml")
    assert batch_size_for(toy, 0.5, (8, 8), 23 * 2**30, on_cpu=True) == MAX_BATCH


def test_activation_checkpointing_where_it_pays():
    """On an accelerator, a 1.6B width at 1024² keeps a usable distillation batch only by checkpointing; small
    latents, with room to spare, do without it. On the CPU it pays where activations are large, and only there."""
    from edgecompile.model.budget import training_activation_bytes, training_batch_for
    from edgecompile.model.config import ModelConfig

    config = ModelConfig.load("recipes/snapgenpp.yaml")
    assert training_activation_bytes(config, 1.0, (128, 128), 1, checkpointed=True) < training_activation_bytes(config, 1.0, (128, 128), 1) / 5
    batch, checkpointing = training_batch_for(config, 1.0, (128, 128), 23 * 2**30, cap=16)
    assert checkpointing and batch >= 1
    assert training_batch_for(config, 1.0, (128, 128), 78 * 2**30, cap=16) == (16, True)
    assert training_batch_for(config, 0.375, (32, 32), 23 * 2**30, cap=16) == (16, False)
    assert training_batch_for(config, 1.0, (128, 128), None, cap=16) == (16, False)  # unknown free memory
    assert training_batch_for(config, 0.375, (32, 32), 23 * 2**30, cap=16, on_cpu=True) == (16, True)  # cheaper on a CPU
    toy = ModelConfig.load("recipes/toy.yaml")
    assert training_batch_for(toy, 0.5, (8, 8), 23 * 2**30, cap=16, on_cpu=True) == (16, False)  # small: it would only recompute


def test_the_statistics_backward_batch_fits_the_free_memory():
    """The layer statistics' backward pass keeps every activation of its batch: its batch shrinks with the free
    memory, down to one input, and never passes its cap."""
    from edgecompile.model.budget import gradient_batch_for
    from edgecompile.model.config import ModelConfig

    config = ModelConfig.load("recipes/snapgenpp.yaml")
    assert gradient_batch_for(config, 0.375, (32, 32), 23 * 2**30, cap=4) == 4
    assert gradient_batch_for(config, 0.375, (32, 32), None, cap=4) == 4  # unknown free memory
    tight = gradient_batch_for(config, 1.0, (64, 64), 23 * 2**30, cap=64)
    assert 1 <= tight < gradient_batch_for(config, 1.0, (64, 64), 80 * 2**30, cap=64)
    assert gradient_batch_for(config, 1.0, (128, 128), 2**30, cap=4) == 1


def test_the_statistics_batches_fit_what_their_sums_leave():
    """The statistics' own sums (F and H) come out of the free memory first: at the paper's width 1.0 on a 24 GiB
    machine the batches shrink to what is left (the export's 64 and 4 were killed there); at width 0.375 they do not."""
    from edgecompile.compress.importance import statistics_bytes
    from edgecompile.compress.palettize_model import layer_shapes
    from edgecompile.model.budget import statistics_batches_for
    from edgecompile.model.config import ModelConfig

    config = ModelConfig.load("recipes/snapgenpp.yaml")
    held = {w: statistics_bytes(layer_shapes(config, w, (32, 32))) for w in (0.375, 1.0)}
    assert held[0.375] < held[1.0] / 3 and held[1.0] > 11 * 2**30  # F alone is the float32 weights, 5.5 GiB at width 1.0
    assert statistics_batches_for(config, 0.375, (32, 32), 21 * 2**30, held[0.375], 64, 4) == (64, 4)
    forward, gradient = statistics_batches_for(config, 1.0, (32, 32), 17 * 2**30, held[1.0], 64, 4)  # 24 GiB less the weights
    assert 1 <= forward < 16 and gradient == 1
    assert statistics_batches_for(config, 1.0, (32, 32), None, held[1.0], 64, 4) == (64, 4)  # unknown free memory
    assert statistics_batches_for(config, 1.0, (32, 32), held[1.0] // 2, held[1.0], 64, 4) == (1, 1)  # never below one


def test_checkpointed_blocks_give_the_same_gradients():
    from edgecompile.compress.distill import detach_trainables
    from edgecompile.deploy.rewrite import deploy_model
    from tests.conftest import CONFIGS, trained_like

    grads = []
    for checkpointing in (False, True):
        student = deploy_model(trained_like(CONFIGS["toy"]), 0.5)
        student.checkpoint_blocks = checkpointing
        params = detach_trainables(student)
        torch.manual_seed(0)
        c = student.config
        out = student(torch.randn(2, c.latent_channels, *student.latent_hw), torch.rand(2), torch.randn(2, c.text_dim, 1, c.text_len))
        out.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    assert torch.equal(grads[0], grads[1])


def test_batch_size_is_recorded_and_checked(tiny_checkpoint, tmp_path, capsys):
    from edgecompile.compress.importance import GRADIENT_BATCH

    code, _, err = run_cli(["export", str(tiny_checkpoint), "--bits", "4", "--batch-size", "0", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "--batch-size" in err and not (tmp_path / "o").exists()
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--width", "1.0", "--bits", "4", "--batch-size", "5", "--distill-steps", "5",
                            "-o", str(tmp_path / "p")], capsys)
    assert code == 0, err
    calibration = json.loads((tmp_path / "p" / "w1.0" / "report.json").read_text())["calibration"]
    assert calibration["batch_size"] == 5 and calibration["distill_batch_size"] == 5
    assert calibration["gradient_batch_size"] == min(5, GRADIENT_BATCH)  # the statistics' backward pass
    assert calibration["statistics_batch_size"] == 5  # and its forward-only pass: what fits, at most --batch-size
    assert calibration["distill_activation_checkpointing"] is False  # small activations on the CPU


class WorkClock:
    """A clock that moves only when a model runs: each forward pass costs `cost(n)` seconds per input, n counting
    the passes so far. No wall time is read, so what a budget buys does not depend on this machine's load."""

    def __init__(self, cost):
        self.now, self.calls, self.cost = 0.0, 0, cost

    def __call__(self) -> float:
        return self.now

    def charge(self, model):
        forward = model.forward

        def timed(latent, *args, **kwargs):
            self.calls += 1
            self.now += self.cost(self.calls) * latent.shape[0]
            return forward(latent, *args, **kwargs)

        model.forward = timed
        return model


def distill_pair(tiny_checkpoint):
    from edgecompile.compress.palettize_model import palettize_deploy, uniform_bits
    from edgecompile.deploy.rewrite import deploy_model

    ckpt = load_checkpoint(tiny_checkpoint)
    calib = default_calibration(ckpt, 1.0, schedules=(4,))
    teacher, student = deploy_model(ckpt.model, 1.0), deploy_model(ckpt.model, 1.0)
    palettize_deploy(student, uniform_bits(student, 4))
    return teacher, student, calib


def test_the_distillation_budget_holds_the_whole_stage_on_a_machine_that_slows_down(tiny_checkpoint):
    """--distill-budget: steps, every evaluation and the closing evaluation fit the budget, re-planned as the
    machine gets three times slower halfway (injected clock: no wall time is measured)."""
    from edgecompile.compress.distill import DistillSettings, distill

    teacher, student, calib = distill_pair(tiny_checkpoint)
    clock = WorkClock(lambda n: 0.01 if n < 60 else 0.03)
    clock.charge(teacher), clock.charge(student)
    result = distill(student, teacher, calib, DistillSettings(budget_seconds=30.0, eval_every=10), clock=clock)
    assert result.seconds <= 30.0 and clock.now <= 30.0  # the budget held, closing evaluation included
    assert result.stopped == "budget" and result.steps_run > 20
    fast_plan = int(30.0 / (0.01 * 16))  # what the first steps' rate alone would have planned
    assert result.steps_run < fast_plan and result.planned_steps == result.steps_run
    assert result.history[-1][0] == result.steps_run  # the last step trained was evaluated
    # evaluations dearer than the whole budget: no step runs, and the stage still ends
    teacher, student, calib = distill_pair(tiny_checkpoint)
    clock = WorkClock(lambda n: 1.0)
    clock.charge(teacher), clock.charge(student)
    none = distill(student, teacher, calib, DistillSettings(budget_seconds=5.0), clock=clock)
    assert none.steps_run == 0 and none.stopped == "no-steps"


def test_step_plan_and_learning_rate():
    from edgecompile.compress.distill import DEFAULT_BUDGET_SECONDS, DEFAULT_STEPS, DistillSettings, StepPlan, learning_rate

    now = [0.0]
    plan = StepPlan(DistillSettings(budget_seconds=10.0, eval_every=5), clock=lambda: now[0])
    plan.opened(train_eval=0.4, held_out_eval=0.1)  # closing evaluation: 0.5 s
    assert plan.closing_cost == pytest.approx(0.5) and plan.may_take(1)
    plan.record_step(1.0)
    now[0] = 8.0
    assert plan.may_take(5)  # 8 + 1 + 0.1 + 0.5 <= 10
    now[0] = 8.5
    assert not plan.may_take(5) and plan.must_evaluate(4)  # the last step the budget holds is evaluated
    fixed = StepPlan(DistillSettings(steps=7), clock=lambda: 1e9)
    assert fixed.may_take(7) and not fixed.may_take(8) and fixed.projected(3) == 7  # a fixed count ignores the clock
    # the default: DEFAULT_STEPS, unless the default budget runs out first
    now[0] = 0.0
    default = StepPlan(DistillSettings(), clock=lambda: now[0])
    assert default.limit == DEFAULT_STEPS and default.budget == DEFAULT_BUDGET_SECONDS and default.projected(0) == DEFAULT_STEPS
    default.record_step(DEFAULT_BUDGET_SECONDS / 40)  # a paper-scale step: the budget holds about 40
    assert default.projected(1) == 1 + 40 and not default.may_take(DEFAULT_STEPS + 1)
    # warmup to the peak, then a linear decay to peak / horizon at the last step
    rates = [learning_rate(1.0, s, 120, 20) for s in range(1, 121)]
    assert rates[0] == pytest.approx(1 / 20) and rates[19] == pytest.approx(101 / 120) and rates[-1] == pytest.approx(1 / 120)
    assert all(a < b for a, b in zip(rates[:19], rates[1:20])) and all(a > b for a, b in zip(rates[19:], rates[20:]))
    assert learning_rate(1.0, 1, 12, 20) == pytest.approx(1 / 2) and learning_rate(1.0, 3, 12, 20) == pytest.approx(10 / 12)  # warmup: a sixth
    assert learning_rate(1.0, 50, 60, 20) > learning_rate(1.0, 50, 55, 20)  # a budget re-planned shorter decays faster
    assert learning_rate(1.0, 70, 60, 20) > 0  # a step past a stale horizon still moves


def test_distill_budget_and_steps_are_exclusive(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--bits", "4", "--distill-steps", "5", "--distill-budget", "1",
                            "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "not both" in err and not (tmp_path / "o").exists()


def test_a_weight_file_over_the_neural_engine_limit_is_reported(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from edgecompile.commands import export

    monkeypatch.setattr(export, "ANE_MAX_WEIGHT_FILE_BYTES", 1024)
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5", "--no-verify", "-o", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "over the Neural Engine's" in err and "--bits 4 or mixed" in err


def test_freed_host_memory_is_released_where_glibc_is_and_skipped_elsewhere(monkeypatch):
    """The helper the statistics and the rounding call between batches: it never fails, with or without glibc."""
    import ctypes.util

    monkeypatch.setattr(device_module, "_LIBC", None)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # a C library ctypes cannot find
    device_module.release_freed_host_memory()
    assert device_module._LIBC is False
    device_module.release_freed_host_memory()  # remembered: no second lookup
    monkeypatch.undo()
    monkeypatch.setattr(device_module, "_LIBC", None)
    device_module.release_freed_host_memory()
    assert device_module._LIBC is not None


def test_the_statistics_are_measured_in_groups_where_their_sums_do_not_fit():
    """At the paper's width 1.0 on a 24 GiB machine (16.5 GiB free beside the weights) the statistics' 13.8 GiB are
    measured in 4 groups of layers; widths 0.375 and 0.5 stay one pass, as does a machine with room."""
    from edgecompile.compress.importance import statistics_bytes
    from edgecompile.compress.palettize_model import layer_shapes
    from edgecompile.model.budget import statistics_groups_for
    from edgecompile.model.config import ModelConfig

    config = ModelConfig.load("recipes/snapgenpp.yaml")
    held = {w: statistics_bytes(layer_shapes(config, w, (32, 32))) for w in (0.375, 0.5, 1.0)}
    free = int(16.5 * 2**30)
    assert statistics_groups_for(held[0.375], free + 3 * 2**30) == 1 and statistics_groups_for(held[0.5], free + 3 * 2**30) == 1
    assert statistics_groups_for(held[1.0], free) == 4
    assert statistics_groups_for(held[1.0], 100 * 2**30) == 1 and statistics_groups_for(held[1.0], None) == 1

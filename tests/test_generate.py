"""Sampling through a package (`edgecompile sample`, `verify --generate`, the export's verify stage)."""

import json

import numpy as np
import pytest
import torch

from edgecompile.coreml.generate import PackageDenoiser, SampleSettings, generate
from edgecompile.coreml.package import load_package
from edgecompile.export import ExportOptions, run_export
from edgecompile.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from edgecompile.model.elastic import extract_width
from tests.test_coreml import run_cli


@pytest.fixture(scope="module")
def bundled_fp16(tmp_path_factory):
    """The bundled digits model at width 0.375 in fp16: its export verifies by sampling too."""
    out = tmp_path_factory.mktemp("gen")
    (report,) = run_export(load_checkpoint(DEFAULT_CHECKPOINT), ExportOptions(output=out, widths=[0.375]))
    return report


def test_export_samples_through_the_package_and_scores_the_digits(bundled_fp16):
    g = bundled_fp16.verify.generation
    assert g is not None and g.labels == [str(i) for i in range(10)] and g.steps == 4
    assert g.non_finite_samples == 0
    assert g.psnr_db > 45  # fp16 package vs fp32 checkpoint after 4 guided steps (65 dB measured at width 0.5)
    assert g.package_accuracy >= 0.9 and g.checkpoint_accuracy >= 0.9
    report = json.loads((bundled_fp16_dir(bundled_fp16) / "report.json").read_text())
    assert report["verify"]["generation"]["grid"] == "samples.png"
    assert (bundled_fp16_dir(bundled_fp16) / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bundled_fp16_dir(report):
    from pathlib import Path

    return Path(report.path).parent


def test_package_denoiser_equals_the_checkpoint_per_call(bundled_fp16):
    """The sampler's view of the package: batches run item by item, text transposed to the package layout."""
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    denoiser = PackageDenoiser(load_package(bundled_fp16.path), precision="fp32", runtime="interpreter")
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0.9, 0.5, 0.1]), ckpt.prompts.tokens[:3]
    with torch.no_grad():
        want = extract_width(ckpt.model, 0.375)(x, t, text)
    got = denoiser(x, t, text)
    assert denoiser.calls == 3
    assert float(((got - want) ** 2).mean()) < 1e-6 * float((want**2).mean())


def test_generation_sees_a_broken_package(bundled_fp16, monkeypatch):
    """Final-sample PSNR falls when the package's output is off, and NaN samples fail verification."""
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    view = load_package(bundled_fp16.path)
    settings = SampleSettings(steps=2)
    good = generate(view, ckpt, ckpt.prompts, ["3", "7"], settings, runtime="interpreter").summary()
    real_call = PackageDenoiser.__call__
    monkeypatch.setattr(PackageDenoiser, "__call__", lambda self, x, t, c: real_call(self, x, t, c) * 1.05)
    off = generate(view, ckpt, ckpt.prompts, ["3", "7"], settings, runtime="interpreter").summary()
    assert off.psnr_db < good.psnr_db - 10
    monkeypatch.setattr(PackageDenoiser, "__call__", lambda self, x, t, c: real_call(self, x, t, c) * float("nan"))
    broken = generate(view, ckpt, ckpt.prompts, ["3"], settings, runtime="interpreter").summary()
    assert broken.non_finite_samples == 1


def test_sample_cli_writes_a_grid_and_compares(bundled_fp16, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    code, out, err = run_cli(["sample", bundled_fp16.path, "-o", str(grid), "--prompt", "4", "--prompt", "7", "--per-prompt", "2",
                              "--steps", "3", "--compare", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["labels"] == ["4", "4", "7", "7"] and data["steps"] == 3 and data["psnr_db"] > 40
    assert data["package_accuracy"] is not None and data["grid"] == str(grid)
    assert grid.read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli(["verify", bundled_fp16.path, "--generate", "--steps", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["generation"]["steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["--prompt", "11"], "is not one of the prompts"),
    (["-o", "OUT/grid.jpg"], "ending in .png"),
    (["--cfg", "0.5"], "--cfg"),
    (["--steps", "0"], "--steps"),
    (["--prompts", "OUT/missing.safetensors"], "not found"),
])
def test_sample_refuses_bad_input_in_one_line(bundled_fp16, tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    output = [] if "-o" in args else ["-o", str(tmp_path / "grid.png")]
    code, out, err = run_cli(["sample", bundled_fp16.path, *output, *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_sample_needs_prompts_for_a_checkpoint_without_them(exported, tiny_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["sample", exported[0.5].path, "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "ships no prompts" in err and len(err.strip().splitlines()) == 1
    # with the user's own embeddings it samples (no classifier for a model that is not the digits one)
    from safetensors.torch import save_file

    ckpt = load_checkpoint(tiny_checkpoint)
    prompts = tmp_path / "p.safetensors"
    save_file({"tokens": torch.randn(2, ckpt.config.text_len, ckpt.config.text_dim), "null": torch.zeros(1, ckpt.config.text_len, ckpt.config.text_dim)},
              str(prompts))
    code, out, err = run_cli(["sample", exported[0.5].path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                              "-o", str(tmp_path / "g.png"), "--steps", "2", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["labels"] == ["prompt 0", "prompt 1"] and data["package_accuracy"] is None and data["psnr_db"] is None
    assert np.isfinite(data["seconds"])


def test_bench_report_shows_the_sample_grids(bundled_fp16, tmp_path, capsys):
    report_json = bundled_fp16_dir(bundled_fp16) / "report.json"
    code, _, err = run_cli(["bench", bundled_fp16.path, "--reports", str(report_json), "--no-host", "-o", str(tmp_path / "bench")], capsys)
    assert code == 0, err
    name = "samples_toy_w0.375_fp16.png"
    assert (tmp_path / "bench" / name).read_bytes()[:4] == b"\x89PNG"
    assert f"![{name}]({name})" in (tmp_path / "bench" / "report.md").read_text()

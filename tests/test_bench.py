"""Latency reports: static analysis, cost model, merged runs and the report files."""

import json

import pytest

from edgecompile.bench.cost_model import Coefficients, calibrated, estimate_ms
from edgecompile.bench.static import deploy_graph_stats
from edgecompile.cli import main
from edgecompile.errors import EdgeCompileError
from edgecompile.model.config import ModelConfig

PLAIN = ModelConfig(name="plain", stage_downsample=False, depth_down=0, depth_up=0, depth_middle=1, middle_skips=False,
                    hidden_dim=16, head_dim=4, num_heads=4, num_kv_heads=2, text_dim=8, text_len=3, widths=(1.0,), ffn_ratio_middle=2.0)


def test_static_macs_match_a_hand_count():
    """One plain block on an 8x8 latent (64 tokens): count every 1x1 conv and attention einsum by hand."""
    s = deploy_graph_stats(PLAIN, 1.0)
    n, d, kv, t, f = 64, 16, 8, 3, 32  # tokens, hidden, kv channels, text tokens, ffn hidden
    conv1x1 = n * (d * d + d * kv * 2 + d * d)  # self q, k, v, out
    conv1x1 += n * (d * d + d * d) + t * (8 * kv * 2)  # cross q, out; k, v on the text tokens
    conv1x1 += n * (d * f + f * d)  # ffn
    conv1x1 += 256 * d + d * d + d * 6 * d  # timestep MLP and modulation (one token)
    conv1x1 += n * d * 1 * 2  # patch embedding (patch 1: a 1x1 conv) and final projection, 1 latent channel
    assert s.macs["conv1x1"] == conv1x1
    assert s.macs["attn_global"] == 2 * n * n * d  # scores + values over all query heads
    assert s.macs["attn_cross"] == 2 * n * t * d
    assert s.macs["attn_bna"] == 0 and s.params > 0 and s.largest_tensor_bytes > 0


def test_bna_is_classed_as_local_attention():
    s = deploy_graph_stats(ModelConfig(), 1.0)
    assert s.macs["attn_bna"] > 0 and s.macs["attn_global"] > 0


def test_estimate_is_a_roofline():
    s = deploy_graph_stats(PLAIN, 1.0)
    fast = Coefficients(1e6, 1e6, 0.0, 1.0)
    # with near-infinite compute, the time is the weight traffic
    est = estimate_ms(s, 16, fast, memory_gbps=1.0)
    weights = sum(w for _, _, w, _ in s.records)
    assert est == pytest.approx(1e3 * weights * 2 / 1e9, rel=1e-3)
    assert estimate_ms(s, 4, fast, 1.0) < est


def test_cost_model_is_calibrated_on_the_paper_and_validated_on_the_ablations():
    r = calibrated("iphone16promax")
    assert [row["paper_ms"] for row in r["calibration"]] == [280, 360, 1580]
    assert [row["paper_ms"] for row in r["validation"]] == [2000, 550, 293, 360]
    assert r["calibration_error_pct"] == max(abs(row["error_pct"]) for row in r["calibration"])
    low = calibrated("iphone12")
    assert low["coefficients"].matrix_gmacs < r["coefficients"].matrix_gmacs


def test_bench_cli_report(exported, tmp_path, capsys):
    pkg = exported[0.5].path
    run = {"format": "edgecompile-bench-run", "device": "iPhone 16 Pro Max", "package": "x", "median_ms": 3.2}
    (tmp_path / "run.json").write_text(json.dumps(run))
    main(["bench", pkg, exported[1.0].path, "--repeats", "2", "--runs", str(tmp_path / "run.json"), "-o", str(tmp_path / "rep"), "--json"])
    data = json.loads(capsys.readouterr().out)
    item = data["items"][0]
    assert item["host"]["median_ms"] > 0 and item["static"]["total_macs"] > 0 and item["estimates_ms"]["iphone16promax"] > 0
    assert "calibration_error_pct" in data["cost_model"] and "validation_error_pct" in data["cost_model"]
    assert data["runs"][0]["median_ms"] == 3.2
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"report.md", "report.html", "bench.json", "latency_per_item.png", "estimate_vs_paper.png"} <= files
    assert item["per_image_ms"]["iphone16promax"] == pytest.approx(item["estimates_ms"]["iphone16promax"] * 8, rel=1e-3)  # 4 steps x 2
    assert item["device_memory_bytes"] > item["weight_bytes"]
    main(["bench", pkg, "--no-host", "-o", str(tmp_path / "one"), "--json"])
    capsys.readouterr()
    assert "latency_per_item.png" not in {p.name for p in (tmp_path / "one").iterdir()}  # one bar compares nothing
    assert "estimate" in (tmp_path / "rep" / "report.md").read_text()


def test_bench_bad_input(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--config", "recipes/toy.yaml", "--no-host", "--runs", str(tmp_path / "bad.json")])
    assert e.value.code == 2 and "edgecompile-bench-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench"])
    with pytest.raises(EdgeCompileError):
        from edgecompile.bench.cost_model import find_profile

        find_profile("nokia3310")

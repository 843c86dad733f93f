"""Calibration sets, sensitivity sweeps, bit allocation and recipes."""

import json
import math

import pytest
import torch

from edgecompile.compress.allocation import allocate_for_psnr, average_bits, greedy, threshold_allocation
from edgecompile.compress.calibration import build_calibration, default_calibration, load_calibration, load_user_prompts
from edgecompile.compress.palettize_model import PaletteCache, palettizable_layers
from edgecompile.compress.recipe import check_recipe_fits, load_recipe, make_recipe, simulated_psnr
from edgecompile.compress.sensitivity import calibration_outputs, output_psnr, swapped_weights, sweep
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.errors import EdgeCompileError
from edgecompile.model.checkpoint import load_checkpoint
from tests.conftest import TINY, trained_like


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    calib = default_calibration(ckpt, 1.0, n_random_prompts=2)
    model = deploy_model(ckpt.model, 1.0)
    return ckpt, calib, model


def test_calibration_is_deterministic_and_follows_the_trajectories(setup, tmp_path):
    ckpt, calib, _ = setup
    again = default_calibration(ckpt, 1.0, n_random_prompts=2)
    assert torch.equal(calib.latent, again.latent) and torch.equal(calib.text, again.text)
    # 2 prompts x (4 steps + 20 steps thinned to 5) x (prompt, null text for CFG)
    assert len(calib) == 2 * (4 + 5) * 2
    assert set(calib.timestep.tolist()) >= {1.0, 0.75, 0.5, 0.25}
    # the first input of each trajectory is the seeded noise; later ones move along the model's velocity
    assert torch.equal(calib.latent[0], calib.latent[2])  # the same x_t with the null text (CFG)
    assert not torch.equal(calib.latent[0], calib.latent[4])
    path = calib.save(tmp_path / "c.safetensors")
    loaded = load_calibration(path)
    assert torch.equal(loaded.latent, calib.latent) and loaded.meta["schedules"] == [4, 20]
    loaded.check(TINY)


def test_calibration_file_errors(tmp_path):
    with pytest.raises(EdgeCompileError, match="not found"):
        load_calibration(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(EdgeCompileError, match="corrupt"):
        load_calibration(bad)
    from safetensors.torch import save_file

    save_file({"tokens": torch.zeros(2, 5, 7)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(EdgeCompileError, match=r"expected \(N >= 1, 3, 16\)"):
        load_user_prompts(tmp_path / "p.safetensors", TINY)


def test_user_prompts_build_a_calibration_set(setup, tmp_path):
    ckpt, _, _ = setup
    from safetensors.torch import save_file

    save_file({"tokens": torch.randn(3, TINY.text_len, TINY.text_dim)}, str(tmp_path / "p.safetensors"))
    tokens, null = load_user_prompts(tmp_path / "p.safetensors", TINY)
    calib = build_calibration(ckpt.model, 0.5, tokens, null, (8, 8), schedules=(4,), seed=3)
    assert len(calib) == 3 * 4  # no null text: no CFG inputs


def test_local_sweep_matches_quantizing_each_layer_alone(setup):
    """The one-pass hook measurement equals the definition: palettize one layer, compare its own output."""
    _, calib, model = setup
    cache = PaletteCache(model)
    result = sweep(model, calib, [4, 8], "local", cache)
    layers = palettizable_layers(model)
    for name in list(layers)[:4]:
        captured = {}
        h = layers[name].register_forward_hook(lambda m, i, o: captured.setdefault("out", []).append(o.detach()))
        calibration_outputs(model, calib)
        ref = torch.cat(captured.pop("out"))
        with swapped_weights(layers, {name: cache.decoded(name, 4)}):
            calibration_outputs(model, calib)  # upstream layers stay unquantized: the layer sees the same input
        out = torch.cat(captured.pop("out"))
        h.remove()
        nmse = float(((out - ref).double() ** 2).sum() / (ref.double() ** 2).sum())
        assert math.isclose(result.sensitivity[name][4], nmse, rel_tol=1e-3)
        assert result.sensitivity[name][8] < result.sensitivity[name][4]
    assert result.cost_forward_passes < 10  # a few forward passes, whatever the number of layers


def test_e2e_sweep_reports_output_psnr(setup):
    _, calib, model = setup
    sub = calib.subset(8)
    result = sweep(model, sub, [4, 8], "e2e", PaletteCache(model))
    name = next(iter(result.sensitivity))
    ref = calibration_outputs(model, sub)
    with swapped_weights(palettizable_layers(model), {name: PaletteCache(model).decoded(name, 4)}):
        out = calibration_outputs(model, sub)
    assert math.isclose(result.psnr_db[name][4], output_psnr(ref, out), rel_tol=1e-6)
    assert all(result.psnr_db[n][8] > result.psnr_db[n][4] for n in result.psnr_db)


def test_greedy_allocation_meets_the_target_and_prefers_sensitive_layers():
    sizes = {"a": 1000, "b": 1000, "c": 8000}
    sens = {"a": {4: 1.0, 8: 0.01}, "b": {4: 0.1, 8: 0.001}, "c": {4: 0.5, 8: 0.005}}
    bits, order = greedy(sens, sizes, [4, 8], target_bits=4.5)
    assert average_bits(bits, sizes) <= 4.5 and bits == {"a": 8, "b": 4, "c": 4}
    all_bits, order = greedy(sens, sizes, [4, 8])
    assert all(b == 8 for b in all_bits.values()) and order[0] == ("a", 8)
    bits, _ = greedy(sens, sizes, [4, 6, 8], target_bits=4.0)
    assert set(bits.values()) == {4}


def test_threshold_allocation_picks_the_highest_threshold_within_budget():
    sizes = {"a": 1, "b": 1, "c": 2}
    psnr = {"a": {4: 40.0, 8: 70.0}, "b": {4: 55.0, 8: 80.0}, "c": {4: 50.0, 8: 75.0}}
    bits, threshold = threshold_allocation(psnr, sizes, [4, 8], target_bits=5.0)
    assert bits == {"a": 8, "b": 4, "c": 4} and average_bits(bits, sizes) <= 5.0 and threshold == 50.0


def test_psnr_target_allocation_reaches_the_target(setup):
    _, calib, model = setup
    cache = PaletteCache(model)
    result = sweep(model, calib, [4, 8], "local", cache)
    ref = result.reference
    # a target that the first greedy upgrade reaches: strictly between all-4 and all-8 bits whatever the layer count
    _, order = greedy(result.sensitivity, result.sizes, [4, 8])
    first = {**dict.fromkeys(result.sizes, 4), order[0][0]: order[0][1]}
    target = simulated_psnr(model, cache, first, calib, ref)
    bits, measured = allocate_for_psnr(result.sensitivity, result.sizes, [4, 8], target,
                                       lambda b: simulated_psnr(model, cache, b, calib, ref))
    assert measured >= target and 4 < average_bits(bits, result.sizes) < 8


def test_recipe_round_trip_and_validation(setup, tmp_path):
    ckpt, calib, model = setup
    recipe = make_recipe(model, TINY.name, 1.0, calib, [4, 8], "local", 5.0)
    assert 4.0 < recipe.average_bits <= 5.0 and recipe.predicted_psnr_db > 20
    path = recipe.save(tmp_path / "r.json")
    loaded = load_recipe(path)
    assert loaded.bits == recipe.bits and math.isclose(loaded.average_bits, recipe.average_bits)
    check_recipe_fits(loaded, palettizable_layers(model), 1.0, "r.json")
    with pytest.raises(EdgeCompileError, match="width 1, not 0.5"):
        check_recipe_fits(loaded, palettizable_layers(model), 0.5, "r.json")
    data = json.loads(path.read_text())
    data["layers"]["down.0.nonexistent"] = {"bits": 4}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(EdgeCompileError, match="does not have"):
        check_recipe_fits(load_recipe(tmp_path / "bad.json"), palettizable_layers(model), 1.0, "bad.json")
    data["layers"]["down.0.nonexistent"] = {"bits": 5}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(EdgeCompileError, match="5 bits"):
        load_recipe(tmp_path / "bad.json")
    (tmp_path / "corrupt.json").write_text("{")
    with pytest.raises(EdgeCompileError, match="corrupt"):
        load_recipe(tmp_path / "corrupt.json")
    with pytest.raises(EdgeCompileError, match="outside the candidate"):
        make_recipe(model, TINY.name, 1.0, calib.subset(4), [4, 8], "local", 9.0)


def test_palette_cache_does_not_touch_the_checkpoint():
    model = trained_like(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy = deploy_model(model, 1.0)
    from edgecompile.compress.palettize_model import palettize_deploy, uniform_bits

    palettize_deploy(deploy, uniform_bits(deploy, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_second_graph_given_the_same_palettes_shares_their_decoded_weights():
    """The distillation student takes the export graph's decoded weights (one copy, not two) and computes what a
    graph decoding its own would; without `share_with` a graph decodes its own."""
    from edgecompile.compress.palettize_model import apply_palettes, palettize_deploy, uniform_bits

    model = trained_like(TINY)
    export_graph = deploy_model(model, 1.0)
    palettes = palettize_deploy(export_graph, uniform_bits(export_graph, 4))
    student, alone = deploy_model(model, 1.0).fuse_attention(), deploy_model(model, 1.0).fuse_attention()
    apply_palettes(student, palettes, share_with=export_graph)
    apply_palettes(alone, palettes)
    shared, own = palettizable_layers(export_graph), palettizable_layers(student)
    assert all(own[n].weight is shared[n].weight for n in palettes)
    assert all(palettizable_layers(alone)[n].weight is not shared[n].weight for n in palettes)
    c = model.config
    x = (torch.randn(2, c.latent_channels, *student.latent_hw), torch.rand(2) * c.max_timestep, torch.randn(2, c.text_dim, 1, c.text_len))
    with torch.no_grad():
        assert torch.equal(student(*x), alone(*x))

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgecompile.errors import EdgeCompileError
from edgecompile.model.checkpoint import load_checkpoint, save_checkpoint
from edgecompile.model.config import ModelConfig
from tests.conftest import TINY, trained_like


@pytest.fixture()
def ckpt(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(trained_like(TINY), path)
    return path


def test_round_trip_gives_the_same_model(ckpt):
    model = trained_like(TINY)
    loaded = load_checkpoint(ckpt)
    assert loaded.config == TINY
    x, t, c = torch.randn(1, 1, 8, 8), torch.rand(1), torch.randn(1, TINY.text_len, TINY.text_dim)
    torch.testing.assert_close(loaded.model(x, t, c, width=0.5), model(x, t, c, width=0.5))


def test_fp16_checkpoint_round_trip(tmp_path):
    model = trained_like(TINY)
    save_checkpoint(model, tmp_path / "h", dtype="float16")
    loaded = load_checkpoint(tmp_path / "h")
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a.half().float(), b), k


def edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("patch_embed.weight"), "1 missing key"),
    (lambda t: t.update(extra=torch.zeros(2)), "1 unexpected key"),
    (lambda t: t.update({"final.bias": torch.zeros(7)}), "shape mismatch"),
    (lambda t: t.update({"final.bias": t["final.bias"].double()}), "declared dtype float32"),
])
def test_load_errors_name_the_problem(ckpt, edit, message):
    edit_weights(ckpt, edit)
    with pytest.raises(EdgeCompileError, match=message):
        load_checkpoint(ckpt)


def test_truncated_weights_are_reported_as_corrupt(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeCompileError, match="corrupt or truncated"):
        load_checkpoint(ckpt)


def test_garbage_weights_are_reported_as_corrupt(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(EdgeCompileError, match="corrupt"):
        load_checkpoint(ckpt)


def test_config_mismatch_is_reported(ckpt):
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["model"]["hidden_dim"] = 64
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(EdgeCompileError, match="does not match its config"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("damage,message", [
    (lambda p: shutil.rmtree(p), "not found"),
    (lambda p: (p / "checkpoint.json").unlink(), "no checkpoint.json"),
    (lambda p: (p / "checkpoint.json").write_text("{not json"), "checkpoint.json is corrupt"),
    (lambda p: (p / "checkpoint.json").write_text('{"format": "other"}'), "not an edgecompile-checkpoint"),
    (lambda p: (p / "model.safetensors").unlink(), "no model.safetensors"),
])
def test_broken_folders_give_one_clear_error(ckpt, damage, message):
    damage(ckpt)
    with pytest.raises(EdgeCompileError, match=message):
        load_checkpoint(ckpt)


def test_unknown_config_field_is_reported(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  hidden_dimm: 3\n")
    with pytest.raises(EdgeCompileError, match="unknown config field.*hidden_dimm"):
        ModelConfig.load(tmp_path / "c.yaml")


def test_existing_output_is_not_overwritten_without_force(ckpt):
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(EdgeCompileError, match="already exists"):
        save_checkpoint(trained_like(TINY, seed=1), ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact_at_every_extreme(dtype):
    """The checkpoint loader's finiteness check is one sum per tensor: NaN and infinities anywhere are found, and the
    largest finite values summed together never overflow into a false alarm."""
    from edgecompile.metrics import all_finite

    big = torch.full((4096,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big) and all_finite(-big) and all_finite(torch.randn(100).to(dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 2047, 4095):
            t = big.clone()
            t[where] = bad
            assert not all_finite(t)
    mixed = big.clone()
    mixed[1], mixed[2] = float("inf"), -float("inf")  # sums to NaN: still found
    assert not all_finite(mixed)
    assert all_finite(torch.arange(10))  # integer tensors hold no NaN


def test_non_finite_weights_are_refused_by_name(ckpt):
    weights = load_file(str(ckpt / "model.safetensors"))
    name = sorted(weights)[3]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[-1] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(EdgeCompileError, match=f"{name}.*NaN or infinite"):
        load_checkpoint(ckpt)

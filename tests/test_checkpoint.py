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


def test_a_checkpoint_loaded_for_a_width_runs_it_and_every_smaller_one_bit_for_bit_and_refuses_larger(tmp_path):
    """load_checkpoint(path, width=W) keeps only what widths up to W read (sliced from the stored fp16 tensors, then
    fp32): the outputs and the extracted widths equal the whole supernetwork's exactly; a larger width, and saving
    the narrowed model as a checkpoint, are refused; NaN outside the width's slices does not stop it."""
    from edgecompile.model.elastic import extract_width

    width = 0.5  # TINY's widths: 0.5 and 1.0
    save_checkpoint(trained_like(TINY), tmp_path / "h", dtype="float16")
    whole, narrow = load_checkpoint(tmp_path / "h"), load_checkpoint(tmp_path / "h", width=width)
    assert narrow.model.narrowed_to == width and whole.model.narrowed_to is None
    assert sum(p.numel() for p in narrow.model.parameters()) < sum(p.numel() for p in whole.model.parameters()) / 2
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in narrow.model.parameters())
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8]), torch.randn(2, TINY.text_len, TINY.text_dim)
    for w in [v for v in TINY.widths if v <= width]:
        with torch.no_grad():
            assert torch.equal(narrow.model(x, t, c, width=w), whole.model(x, t, c, width=w)), w
        a, b = extract_width(whole.model, w).state_dict(), extract_width(narrow.model, w).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), w
    with pytest.raises(ValueError, match="holds widths up to"):
        narrow.model(x, t, c, width=1.0)
    with pytest.raises(ValueError, match="holds widths up to"):
        extract_width(narrow.model, 1.0)
    with pytest.raises(ValueError, match="holds widths up to"):
        save_checkpoint(narrow.model, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    assert load_checkpoint(tmp_path / "h", width=1.0).model.narrowed_to is None  # the whole width: nothing to cut
    assert load_checkpoint(tmp_path / "h", width=0.375).model.narrowed_to is None  # not one of its widths: loaded whole

    def poison_outside(tensors):  # the last output row of a full-width-only slice
        name = "t_mlp2.weight"
        tensors[name] = tensors[name].clone()
        tensors[name][-1, -1] = float("nan")
    edit_weights(tmp_path / "h", poison_outside)
    assert load_checkpoint(tmp_path / "h", width=width).model.narrowed_to == width
    with pytest.raises(EdgeCompileError, match="t_mlp2.weight.*NaN or infinite"):
        load_checkpoint(tmp_path / "h")

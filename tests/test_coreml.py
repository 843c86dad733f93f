import json

import numpy as np
import pytest

from edgecompile.cli import main
from edgecompile.coreml.interpreter import MILInterpreter
from edgecompile.coreml.package import layout_ops_per_block, load_package, weight_census
from edgecompile.errors import EdgeCompileError
from edgecompile.export import verify_exported
from edgecompile.export_report import without_timings


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def package_path(report):
    return report.path


def test_package_io_contract_and_metadata(exported):
    view = load_package(package_path(exported[0.5]))
    assert [i["name"] for i in view.inputs] == ["latent_image_embeddings", "timestep", "token_level_text_embeddings"]
    assert view.inputs[0]["shape"] == [1, 1, 8, 8] and view.inputs[2]["shape"] == [1, 16, 1, 3]
    assert all(f["dtype"] == "float32" for f in view.inputs + view.outputs)
    assert view.outputs[0]["name"] == "denoiser_output"
    meta = view.metadata
    for key in ("edgecompile.version", "coremltools.version", "edgecompile.width", "edgecompile.params",
                "edgecompile.config_sha256", "edgecompile.checkpoint_sha256"):
        assert meta[key]
    assert meta["edgecompile.width"] == "0.5"
    assert view.spec.description.metadata.shortDescription


def test_layout_ops_per_block_are_bounded(exported):
    view = load_package(package_path(exported[1.0]))
    per_block = layout_ops_per_block(view)
    for block, counts in per_block.items():
        if block.startswith(("down", "up")):
            assert counts["transpose"] <= 3  # BNA keys, compressed keys, cross-attention keys
        elif block.startswith("middle"):
            assert counts["transpose"] <= 2


def test_verify_fp16_package_with_fp32_interpreter_at_60_db(exported, tiny_checkpoint):
    for width in (0.5, 1.0):
        result = verify_exported(package_path(exported[width]), tiny_checkpoint)
        assert result.psnr_db >= 60, result
        assert result.runtime.startswith("mil-interpreter")


def test_fp16_emulation_predicts_device_numerics(exported, tiny_checkpoint):
    result = verify_exported(package_path(exported[0.5]), tiny_checkpoint, precision="fp16")
    fp32 = verify_exported(package_path(exported[0.5]), tiny_checkpoint)
    assert 35 <= result.psnr_db < fp32.psnr_db


def test_verify_refuses_a_different_checkpoint(exported, tmp_path):
    from edgecompile.model.checkpoint import save_checkpoint
    from tests.conftest import TINY, trained_like

    save_checkpoint(trained_like(TINY, seed=7), tmp_path / "other")
    with pytest.raises(EdgeCompileError, match="another checkpoint"):
        verify_exported(package_path(exported[0.5]), tmp_path / "other")


def test_interpreter_names_an_unknown_op():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        return mb.erf(x=x)

    with pytest.raises(EdgeCompileError, match="erf"):
        MILInterpreter(prog)


def test_interpreter_ops_match_torch():
    import torch
    from coremltools.converters.mil import Builder as mb

    g = np.random.default_rng(0)
    w = g.standard_normal((6, 2, 3, 3)).astype(np.float32)
    wt = g.standard_normal((4, 5, 2, 2)).astype(np.float32)
    x = g.standard_normal((1, 4, 7, 6)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x):
        a = mb.conv(x=x, weight=w, strides=[2, 1], pad_type="same", groups=2)
        b = mb.conv_transpose(x=x, weight=wt, strides=[2, 2])
        c = mb.slice_by_index(x=x, begin=[0, 1, 0, 2], end=[1, 3, 7, 6], stride=[1, 1, 2, 1])
        d = mb.layer_norm(x=x, axes=[1], epsilon=1e-5)
        return a, b, c, d

    a, b, c, d = MILInterpreter(prog).run({"x": x}).values()
    tx = torch.from_numpy(x)
    np.testing.assert_allclose(a, torch.nn.functional.conv2d(tx, torch.from_numpy(w), stride=(2, 1), padding=(1, 1), groups=2).numpy(), atol=1e-4)
    np.testing.assert_allclose(b, torch.nn.functional.conv_transpose2d(tx, torch.from_numpy(wt), stride=2).numpy(), atol=1e-4)
    np.testing.assert_allclose(c, x[:, 1:3, ::2, 2:6])
    ln = torch.nn.functional.layer_norm(tx.permute(0, 2, 3, 1), (4,), eps=1e-5).permute(0, 3, 1, 2)
    np.testing.assert_allclose(d, ln.numpy(), atol=1e-4)


def test_interpreter_batch_norm_matches_torch():
    import torch
    from coremltools.converters.mil import Builder as mb

    g = np.random.default_rng(1)
    x = g.standard_normal((1, 3, 4, 5)).astype(np.float32)
    mean, var, gamma, beta = (g.standard_normal(3).astype(np.float32) for _ in range(4))
    var = np.abs(var) + 0.1

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x):
        return mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=1e-3)

    out = list(MILInterpreter(prog).run({"x": x}).values())[0]
    ref = torch.nn.functional.batch_norm(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var),
                                         torch.from_numpy(gamma), torch.from_numpy(beta), eps=1e-3)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_cli_inspect_and_verify_json(exported, tiny_checkpoint, capsys):
    path = package_path(exported[0.5])
    code, out, _ = run_cli(["inspect", path, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and {"ops", "inputs", "outputs", "metadata", "weight_bytes"} <= set(data)
    assert data["ops"]["einsum"] > 0 and data["weight_bytes"] == weight_census(load_package(path))["weight_bytes"]
    code, out, _ = run_cli(["verify", path, "--checkpoint", str(tiny_checkpoint), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["psnr_db"] >= 60
    # where its time went: the package's runs and the torch reference's (no chunks here); timings, not results
    assert data["package_seconds"] > 0 and data["reference_seconds"] > 0 and "chunks_seconds" in data
    assert not {"package_seconds", "reference_seconds", "chunks_seconds"} & set(without_timings(data))


def test_cli_export_json_and_onnx(tiny_checkpoint, tmp_path, capsys):
    code, out, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5", "--format", "onnx", "-o", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)["packages"][0]
    assert report["path"].endswith(".onnx") and (tmp_path / "w0.5" / "report.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["export", "/nonexistent/ckpt", "-o", "OUT"], "not found"),
    (["export", "CKPT", "--width", "0.3", "-o", "OUT"], "does not divide"),
    (["export", "CKPT", "--latent", "7x8", "-o", "OUT"], "divisible"),
    (["export", "CKPT", "--width", "abc", "-o", "OUT"], "not a number"),
    (["verify", "/nonexistent.mlpackage"], "not found"),
    (["inspect", "CKPT"], "not an .mlpackage"),
    (["info", "/nonexistent"], "not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tiny_checkpoint, tmp_path, capsys):
    args = [str(tiny_checkpoint) if a == "CKPT" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "w0.5"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5", "-o", str(tmp_path), "--format", "onnx"], capsys)
    assert code == 2 and "--force" in err and (target / "keep.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["w0.5"]  # no temporary left behind


def test_bundled_checkpoint_exports_and_verifies(tmp_path):
    """The path `make demo` takes, on trained weights (they convert to ops random weights do not, e.g. batch_norm).
    Sampling through the package is test_generate's: skipped here."""
    from edgecompile.export import ExportOptions, VerificationOptions, run_export
    from edgecompile.model.checkpoint import load_checkpoint

    report = run_export(load_checkpoint(), ExportOptions(output=tmp_path, widths=[0.375], verification=VerificationOptions(generate=False)))[0]
    assert report.verify.psnr_db >= 60
    assert load_package(report.path).metadata["edgecompile.width"] == "0.375"


def test_interrupted_export_leaves_no_partial_output(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import edgecompile.commands.write as export
    from edgecompile.export import ExportOptions, run_export
    from edgecompile.model.checkpoint import load_checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "convert_to_mlmodel", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export(load_checkpoint(tiny_checkpoint), ExportOptions(output=tmp_path / "a", widths=[0.5]))
    assert not (tmp_path / "a").exists()  # neither the package folder, a temporary, nor the folder made for them
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5", "-o", str(tmp_path / "b")], capsys)
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "b").exists()

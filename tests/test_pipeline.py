"""The whole export pipeline users run (`--bits mixed`), self-distillation, determinism and bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgecompile.cli import main
from edgecompile.compress.calibration import default_calibration
from edgecompile.compress.distill import DistillSettings, bias_correction, distill
from edgecompile.compress.palettize_model import palettize_deploy, uniform_bits
from edgecompile.compress.sensitivity import calibration_outputs, output_psnr
from edgecompile.coreml.interpreter import OPS
from edgecompile.coreml.package import load_package
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.errors import EdgeCompileError
from edgecompile.export import CompressionOptions, ExportOptions, PackageOptions, VerificationOptions, SweepSettings, run_export, verify_exported
from edgecompile.model.checkpoint import load_checkpoint

FAST = dict(distill_steps=30)  # CompressionOptions keywords


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def mixed(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    report = run_export(ckpt, ExportOptions(output=out, widths=[1.0],
        compression=CompressionOptions(bits="mixed", sweep=SweepSettings(target_bits=5.0), **FAST)))[0]
    return out, report


def test_distillation_improves_on_palettization_and_bias_correction(ckpt):
    calib = default_calibration(ckpt, 1.0, n_random_prompts=2)
    teacher = deploy_model(ckpt.model, 1.0)
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    student, corrected = deploy_model(ckpt.model, 1.0), deploy_model(ckpt.model, 1.0)
    for m in (student, corrected):
        palettize_deploy(m, uniform_bits(m, 4))
    ref = calibration_outputs(teacher, calib)
    palettized = output_psnr(ref, calibration_outputs(student, calib))
    assert bias_correction(corrected, teacher, calib) > 0
    result = distill(student, teacher, calib, DistillSettings(steps=60, eval_every=10))
    assert result.holdout_psnr_after_db >= result.holdout_psnr_before_db
    assert output_psnr(ref, calibration_outputs(student, calib)) > palettized + 1.0
    assert all(torch.equal(before[k], v) for k, v in ckpt.model.state_dict().items())  # the checkpoint is untouched
    # palettized weights stay frozen: only biases, norm affines and modulation tables moved
    for (n, a), (_, b) in zip(student.named_parameters(), corrected.named_parameters()):
        if n.endswith(".weight") and "norm" not in n:
            assert torch.equal(a, b), n


def test_mixed_export_writes_recipe_report_and_verifies(mixed, ckpt):
    out, report = mixed
    folder = out / "w1.0"
    assert {p.name for p in folder.iterdir()} == {report.package, "recipe.json", "report.json", "distilled.safetensors", "palettes.safetensors"}
    saved = json.loads((folder / "report.json").read_text())
    for key in ("bits_per_layer", "average_bits", "calibration_psnr_db", "distill", "stage_seconds", "verify", "size_bytes"):
        assert key in saved, key
    # the figure on inputs no compression step saw comes first
    compression_keys = [k for k in saved if k in ("heldout_psnr_db", "calibration", "calibration_psnr_db", "distill")]
    assert compression_keys[0] == "heldout_psnr_db" and set(saved["heldout_psnr_db"]) == {"palettized", "distilled"}
    assert saved["calibration"]["held_out"] > 0 and saved["palette_method"] == "output-aware"
    assert saved["recipe"]["mode"] == "propagated" and saved["distill"]["stopped"] in ("steps", "no-gain")  # 30 steps from 61 dB: see test_output_aware
    assert {"calibrate", "statistics", "sweep", "palettize", "distill", "convert", "verify"} <= set(saved["stage_seconds"])
    assert 4.0 < saved["average_bits"] <= 5.0
    assert saved["verify"]["psnr_db"] >= 60  # the package equals the distilled, palettized simulation
    again = verify_exported(report.path, ckpt.path)
    assert again.psnr_db >= 60 and again.reference.startswith("edgecompile's compressed")


def test_recipe_reuse_and_determinism(mixed, ckpt, tmp_path):
    out, report = mixed
    second = run_export(ckpt, ExportOptions(output=tmp_path, widths=[1.0],
        compression=CompressionOptions(bits="mixed", recipe=out / "w1.0" / "recipe.json", **FAST)))[0]
    assert second.compression.bits_per_layer == report.compression.bits_per_layer
    # same checkpoint and options: the same weights in the package
    a = load_package(report.path)
    b = load_package(second.path)
    weights = lambda v: {op.outputs[0].name: OPS["constexpr_lut_to_dense"](**{k: x.val for k, x in op.inputs.items()})  # noqa: E731
                         for op in v.main.operations if op.op_type == "constexpr_lut_to_dense"}
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    sa, sb = load_file(str(out / "w1.0" / "distilled.safetensors")), load_file(str(tmp_path / "w1.0" / "distilled.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_grouped_luts_decode_exactly(ckpt, tmp_path):
    report = run_export(ckpt, ExportOptions(output=tmp_path, widths=[0.5], compression=CompressionOptions(bits="4", group_size=4, distill=False),
        package=PackageOptions(target="iOS18")))[0]
    view = load_package(report.path)
    luts = [op for op in view.main.operations if op.op_type == "constexpr_lut_to_dense"]
    assert luts and any(op.inputs["lut"].val.shape[0] > 1 for op in luts)  # several LUTs per weight
    assert report.verify.psnr_db >= 60


def test_swift_resources_layout(ckpt, tmp_path):
    report = run_export(ckpt, ExportOptions(output=tmp_path, widths=[0.5],
        package=PackageOptions(swift_resources=True), verification=VerificationOptions(verify=False)))[0]
    res = tmp_path / "w0.5" / "Resources"
    assert (res / "MultiModalDiffusionTransformer.mlpackage").is_dir() and (res / "compile_resources.sh").is_file()
    contract = json.loads((res / "denoiser_contract.json").read_text())
    assert set(contract["inputs"]) == {"latent_image_embeddings", "timestep", "token_level_text_embeddings"}
    assert report.package == "Resources/MultiModalDiffusionTransformer.mlpackage"


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "'5' is not one of '16', '8', '6', '4', 'mixed'"),
    (["--bits", "mixed", "--target-bits", "9"], "--target-bits 9 is outside"),
    (["--bits", "mixed", "--candidates", "4,5"], "--candidates 4,5"),
    (["--bits", "4", "--group-size", "4"], "need iOS18"),
    (["--bits", "16", "--group-size", "4", "--target", "iOS18"], "applies to palettized"),
    (["--bits", "4", "--recipe", "r.json"], "applies to --bits mixed"),
    (["--bits", "mixed", "--recipe", "missing.json"], "not found"),
    (["--width", "0.3"], "width 0.3"),
    (["--bits", "mixed", "--distill-steps", "-1"], "must be >= 0"),
    (["--bits", "mixed", "--calibration", "missing.safetensors"], "not found"),
])
def test_bad_export_options_are_one_line_errors_with_nothing_written(tiny_checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_checkpoint), "-o", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unknown_recipe_layer_and_existing_output(mixed, tiny_checkpoint, tmp_path, capsys):
    out, _ = mixed
    recipe = json.loads((out / "w1.0" / "recipe.json").read_text())
    recipe["layers"]["middle.9.attn.q"] = {"bits": 4, "size": 1}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_checkpoint), "--width", "1.0", "--bits", "mixed", "--recipe", str(tmp_path / "r.json"), "-o", str(tmp_path / "o")])
    assert e.value.code == 2 and "middle.9.attn.q" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_checkpoint), "--width", "1.0", "-o", str(out)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_interrupted_mixed_export_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import edgecompile.commands.compression as export

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "distill", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_export(ckpt, ExportOptions(output=tmp_path / "o", widths=[1.0], compression=CompressionOptions(bits="4", **FAST)))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_recipe_sweep_cli(tiny_checkpoint, tmp_path, capsys):
    main(["sweep", str(tiny_checkpoint), "--width", "1.0", "--target-bits", "5", "-o", str(tmp_path / "r.json"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert 4.0 < data["average_bits"] <= 5.0 and data["sweep"]["cost_forward_passes"] < 10
    with pytest.raises(EdgeCompileError, match="not both"):
        main_raw = __import__("edgecompile.cli", fromlist=["cli"]).cli
        main_raw.main(["sweep", str(tiny_checkpoint), "--target-bits", "4.5", "--target-psnr", "40", "-o", str(tmp_path / "x.json")],
                      standalone_mode=False)

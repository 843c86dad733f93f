import numpy as np
import pytest
import torch

from edgecompile.compress.palettize_model import palettizable_layers, palettize_deploy
from edgecompile.compress.simulate import simulated_model_for_package
from edgecompile.coreml.interpreter import OPS
from edgecompile.coreml.package import load_package, weight_census
from edgecompile.coreml.palettize import const_name
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.export import CompressionOptions, ExportOptions, run_export, verify_exported
from edgecompile.model.checkpoint import load_checkpoint, save_checkpoint
from edgecompile.model.config import ModelConfig
from tests.conftest import trained_like

SMALL = ModelConfig(name="small", hidden_dim=64, head_dim=16, num_heads=4, num_kv_heads=2, text_dim=16, text_len=3,
                    depth_down=1, depth_middle=2, depth_up=1, widths=(0.5, 1.0), bna_blocks=4)


@pytest.fixture(scope="module")
def palettized(tmp_path_factory):
    root = tmp_path_factory.mktemp("pal")
    save_checkpoint(trained_like(SMALL), root / "ckpt")
    ckpt = load_checkpoint(root / "ckpt")
    report = run_export(ckpt, ExportOptions(output=root / "out", widths=[1.0], compression=CompressionOptions(bits="4", distill=False)))[0]
    return ckpt, report


def test_package_decodes_to_exactly_the_simulated_weights(palettized):
    ckpt, report = palettized
    view = load_package(report.path)
    deploy = simulated_model_for_package(view, ckpt)  # the checkpoint with the palettes saved beside the package
    expected = {const_name(n): m.weight.detach().numpy().astype(np.float16) for n, m in palettizable_layers(deploy).items()}
    decoded = {}
    for op in view.main.operations:
        if op.op_type == "constexpr_lut_to_dense":
            ins = {k: v.val for k, v in op.inputs.items()}
            decoded[op.outputs[0].name] = OPS["constexpr_lut_to_dense"](**ins)
    assert len(decoded) == len(expected) > 5
    for name, value in decoded.items():
        key = next(k for k in expected if name.startswith(k.removesuffix("_to_fp16")))
        assert np.array_equal(value.reshape(expected[key].shape), expected[key]), name


def test_palettized_package_reports_bits_and_verifies(palettized):
    ckpt, report = palettized
    census = weight_census(load_package(report.path))
    assert census["average_bits"] == 4.0 and report.average_bits == 4.0
    result = verify_exported(report.path, ckpt.path)
    assert result.psnr_db >= 60 and result.reference.startswith("edgecompile's compressed")
    assert result.psnr_vs_checkpoint_db < result.psnr_db  # 4-bit weights differ from the checkpoint


def test_recipe_naming_an_unknown_layer_is_an_error():
    from edgecompile.errors import EdgeCompileError

    deploy = deploy_model(trained_like(SMALL), 1.0)
    with pytest.raises(EdgeCompileError, match="does not have"):
        palettize_deploy(deploy, {"down.0.nonexistent": 4})
    with torch.no_grad():
        assert palettizable_layers(deploy)

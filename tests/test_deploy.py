import numpy as np
import pytest
import torch

from edgecompile.deploy.contract import example_inputs, text_from_package
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.errors import EdgeCompileError
from edgecompile.metrics import psnr_db
from tests.conftest import CONFIGS, TINY, trained_like


@pytest.mark.parametrize("name", CONFIGS)
def test_deploy_equals_reference_at_100_db_for_every_width(name):
    config = CONFIGS[name]
    model = trained_like(config)
    for w in config.widths:
        deploy = deploy_model(model, w)
        latent, t, text = example_inputs(deploy, batch=2, seed=3)
        with torch.no_grad():
            ref = model(latent, t, text_from_package(text), width=w)
            out = deploy(latent, t, text)
        assert psnr_db(ref.numpy(), out.numpy()) >= 100, (name, w)


def test_query_chunking_changes_nothing():
    model = trained_like(CONFIGS["toy"])
    plain, chunked = deploy_model(model, 0.5), deploy_model(model, 0.5, query_chunk=24)
    ex = example_inputs(plain)
    with torch.no_grad():
        assert psnr_db(plain(*ex).numpy(), chunked(*ex).numpy()) >= 100


@pytest.mark.parametrize("latent_hw", [(16, 8), (8, 12), (12, 8), (16, 16)])
def test_deploy_at_another_latent_size(latent_hw):
    # 8x12 gives BNA blocks 3 tokens wide: the strided convolutions then read the raster map, not the strips
    model = trained_like(CONFIGS["toy"])
    deploy = deploy_model(model, 1.0, latent_hw=latent_hw)
    assert deploy.layout.strided_in_strips == (latent_hw[1] % 8 == 0)
    ex = example_inputs(deploy, batch=2)
    with torch.no_grad():
        ref = model(ex[0], ex[1], text_from_package(ex[2]))
        assert psnr_db(ref.numpy(), deploy(*ex).numpy()) >= 100


def test_latent_size_rules_live_in_the_config_and_name_sizes_that_work():
    config = CONFIGS["toy"]
    config.check_latent_size(8, 12)  # relaxed: the deploy layout handles 3-token-wide BNA blocks
    with pytest.raises(EdgeCompileError, match=r"^latent 8x10 .*4x4.*sizes that work nearby: 8x8, 8x12"):
        config.check_latent_size(8, 10)
    for hw in config.nearby_latent_sizes(7, 9, count=5):
        deploy_model(trained_like(config), 0.5, latent_hw=hw)  # every size the error suggests builds


def traced_ops(module, ex):
    graph = torch.jit.trace(module, ex, check_trace=False).inlined_graph
    return [n.kind() for n in graph.nodes()]


def test_bna_loop_has_no_layout_ops_and_one_key_transpose_per_attention_layer():
    model = trained_like(CONFIGS["toy"])
    deploy = deploy_model(model, 0.5)
    attn = deploy.down[0].attn
    d = attn.d
    seq = 64
    q = torch.randn(1, d.attn_dim, 1, seq)
    k_t = torch.randn(1, seq, 1, d.kv_dim)
    v = torch.randn(1, d.kv_dim, 1, seq)
    loop_ops = traced_ops(lambda q, k, v: attn.bna(q, k, v), (q, k_t, v))
    assert not [o for o in loop_ops if o in ("aten::transpose", "aten::permute", "aten::reshape", "aten::view")]
    assert loop_ops.count("aten::einsum") == 2 * d.heads * len(attn.layout.neighbour_blocks)
    x = torch.randn(1, d.hidden, 8, 8)
    layer_ops = traced_ops(attn, (x,))
    assert layer_ops.count("aten::transpose") == 1  # BNA keys and compressed global keys share one transpose
    middle_ops = traced_ops(deploy.middle[0].attn, (torch.randn(1, d.hidden, 4, 4),))
    assert middle_ops.count("aten::transpose") == 1


def test_onnx_export_matches_torch(tmp_path):
    import onnxruntime as ort

    from edgecompile.deploy.onnx_export import export_onnx

    deploy = deploy_model(trained_like(TINY), 0.5)
    path = export_onnx(deploy, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ex = example_inputs(deploy, seed=5)
    out = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], [e.numpy() for e in ex])))[0]
    with torch.no_grad():
        assert psnr_db(deploy(*ex).numpy(), out) >= 60
    assert [i.name for i in sess.get_inputs()] == ["latent_image_embeddings", "timestep", "token_level_text_embeddings"]
    assert np.isfinite(out).all()

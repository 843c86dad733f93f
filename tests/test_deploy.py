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


def test_bna_is_one_einsum_pair_per_head_over_the_block_axis_with_one_key_transpose():
    model = trained_like(CONFIGS["toy"])
    deploy = deploy_model(model, 0.5)
    attn = deploy.down[0].attn
    d = attn.d
    seq = 64
    q = torch.randn(1, d.attn_dim, 1, seq)
    k = torch.randn(1, d.kv_dim, 1, seq)
    v = torch.randn(1, d.kv_dim, 1, seq)
    bna_ops = traced_ops(lambda q, k, v: attn.bna(q, k, v), (q, k, v))
    assert bna_ops.count("aten::einsum") == 2 * d.heads  # not 2 per head and block: the blocks are the einsums' h axis
    assert bna_ops.count("aten::transpose") == 1 and "aten::permute" not in bna_ops  # the BNA key transpose, nothing else
    assert len(attn.layout.slot_offsets) == 9  # a 4x4 grid of blocks, radius 1: the 3x3 shifts of the block axis
    x = torch.randn(1, d.hidden, 8, 8)
    layer_ops = traced_ops(attn, (x,))
    assert layer_ops.count("aten::transpose") == 2  # BNA keys, compressed global keys
    middle_ops = traced_ops(deploy.middle[0].attn, (torch.randn(1, d.hidden, 4, 4),))
    assert middle_ops.count("aten::transpose") == 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_attention_computes_the_split_einsum_graph(name):
    """The batched kernels of torch-only graphs (sweep, distillation, verification references) equal the converted
    layout to float32 rounding, forward and backward (the gradients distillation follows)."""
    config = CONFIGS[name]
    deploy = deploy_model(trained_like(config), 0.5)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, config.latent_channels, *config.sample_size, generator=g)
    t, text = torch.tensor([200.0, 700.0]), torch.randn(2, config.text_dim, 1, config.text_len, generator=g)

    def run(fused: bool):
        deploy.fuse_attention(fused)
        bias = deploy.patch_embed.bias  # its gradient flows back through every attention layer
        bias.requires_grad_(True)
        bias.grad = None
        out = deploy(latent, t, text)
        out.square().mean().backward()
        return out.detach(), bias.grad.clone()

    (split_out, split_grad), (fused_out, fused_grad) = run(False), run(True)
    assert psnr_db(split_out.numpy(), fused_out.numpy()) > 120
    assert psnr_db(split_grad.numpy(), fused_grad.numpy()) > 100


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

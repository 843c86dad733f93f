import math

import pytest
import torch
import torch.nn.functional as F

from edgecompile.errors import EdgeCompileError
from edgecompile.model.config import ModelConfig
from edgecompile.model.dit import EfficientDiT, SelfAttention, blockwise_neighbourhood_attention, bna_mask, gqa_attention
from edgecompile.model.elastic import count_params, extract_width
from tests.conftest import CONFIGS, trained_like


def inputs(config, batch=2, hw=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = hw or config.sample_size
    return (torch.randn((batch, config.latent_channels, h, w), generator=g), torch.rand((batch,), generator=g),
            torch.randn((batch, config.text_len, config.text_dim), generator=g))


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shape_every_width(name):
    config = CONFIGS[name]
    model = trained_like(config)
    x, t, text = inputs(config)
    for w in config.widths:
        out = model(x, t, text, width=w)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_one_checkpoint_runs_at_other_resolutions_and_aspect_ratios():
    config = ModelConfig()
    model = trained_like(config)
    for hw in [(8, 8), (8, 16), (16, 8), (16, 16)]:
        x, t, text = inputs(config, hw=hw)
        assert model(x, t, text, width=0.5).shape == x.shape


def test_bad_latent_size_is_a_clear_error():
    config = ModelConfig()
    model = trained_like(config)
    x, t, text = inputs(config, hw=(8, 6))
    with pytest.raises(EdgeCompileError, match="grid BNA|divisible"):
        model(x, t, text)


def explicit_eq3_mask(h, w, n_blocks, radius, tiling):
    """Eq. 3 straight from its definition, one (query, key) token pair at a time."""
    side = math.isqrt(n_blocks)
    def block(i):
        y, x = divmod(i, w)
        if tiling == "sequence":
            return (i // (h * w // n_blocks),)
        return (y // (h // side), x // (w // side))
    mask = torch.zeros(h * w, h * w, dtype=torch.bool)
    for i in range(h * w):
        for j in range(h * w):
            mask[i, j] = max(abs(a - b) for a, b in zip(block(i), block(j))) <= radius
    return mask


@pytest.mark.parametrize("tiling,hw,blocks,radius", [("grid", (8, 8), 16, 1), ("grid", (8, 16), 4, 1), ("sequence", (8, 8), 16, 1),
                                                      ("sequence", (8, 8), 8, 2), ("grid", (8, 8), 16, 0)])
def test_bna_equals_dense_attention_with_the_eq3_mask(tiling, hw, blocks, radius):
    config = ModelConfig(bna_tiling=tiling, bna_blocks=blocks, bna_radius=radius, sample_size=hw)
    h, w = hw
    mask = explicit_eq3_mask(h, w, blocks, radius, tiling)
    assert torch.equal(bna_mask(config, h, w), mask)
    g = torch.Generator().manual_seed(0)
    q = torch.randn((2, 4, h * w, 6), generator=g)
    k, v = torch.randn((2, 2, h * w, 6), generator=g), torch.randn((2, 2, h * w, 6), generator=g)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(blockwise_neighbourhood_attention(config, q, k, v, h, w), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gqa_attention(q, k, v, mask=mask), dense, atol=1e-5, rtol=1e-5)


def test_paper_setting_gives_nine_neighbour_blocks():
    config = ModelConfig(sample_size=(64, 64), bna_blocks=16, bna_radius=1, bna_tiling="grid")
    mask = bna_mask(config, 16, 16)  # 4x4 blocks of 4x4 tokens
    block_tokens = 16
    centre_query = 5 * 16 + 5  # token in block (1, 1): an interior block
    assert mask[centre_query].sum() == 9 * block_tokens


def test_kv_compression_is_a_2x2_stride2_depthwise_conv_on_the_token_grid():
    config = ModelConfig()
    attn = SelfAttention(config, sparse=True)
    torch.nn.init.normal_(attn.k_compress.weight)
    d = config.dims(1.0)
    h, w = 4, 6
    tokens = torch.randn(1, h * w, d.kv_dim)
    out = SelfAttention.compress(attn.k_compress, tokens, d, h, w)
    assert out.shape == (1, h * w // 4, d.kv_dim)
    wgt, bias = attn.k_compress.weight[:, 0], attn.k_compress.bias
    grid = tokens.view(h, w, d.kv_dim)
    for i in range(h // 2):
        for j in range(w // 2):
            expect = bias.clone()
            for a in range(2):
                for b in range(2):
                    expect += grid[2 * i + a, 2 * j + b] * wgt[:, a, b]
            torch.testing.assert_close(out[0, i * (w // 2) + j], expect, atol=1e-5, rtol=1e-5)


def test_gate_mixes_global_and_local_per_head():
    config = ModelConfig()
    model = trained_like(config)
    attn = model.down[0].attn
    d = config.dims(1.0)
    x = torch.randn(2, 64, d.hidden)
    with torch.no_grad():
        attn.gate.weight.zero_()
        attn.gate.bias.fill_(40.0)  # sigmoid -> 1: global branch only
        all_global = attn(x, d, (8, 8))
        attn.gate.bias.fill_(-40.0)  # -> 0: BNA only
        all_local = attn(x, d, (8, 8))
        attn.gate.bias.zero_()
        half = attn(x, d, (8, 8))
    # out-projection is linear: gate 0.5 gives the mean of the two branches (minus the shared bias once)
    torch.testing.assert_close(half, (all_global + all_local) / 2, atol=1e-5, rtol=1e-4)
    assert (all_global - all_local).abs().max() > 1e-3
    with torch.no_grad():  # an input-dependent gate: per-head values vary over tokens
        torch.nn.init.normal_(attn.gate.weight)
        g = torch.sigmoid(attn.gate(x, d.hidden, d.heads))
    assert g.shape == (2, 64, d.heads) and g.std(dim=1).min() > 1e-3


@pytest.mark.parametrize("name", CONFIGS)
def test_extracted_width_equals_supernetwork_at_that_width(name):
    config = CONFIGS[name]
    model = trained_like(config)
    x, t, text = inputs(config)
    for w in config.widths:
        dense = extract_width(model, w)
        assert dense.config.widths == (1.0,) and dense.config.hidden_dim == config.dims(w).hidden
        assert sum(p.numel() for p in dense.parameters()) == count_params(config, w)
        torch.testing.assert_close(dense(x, t, text), model(x, t, text, width=w), atol=1e-6, rtol=1e-5)


def test_cross_attention_kv_keep_full_text_input_and_norms_are_per_width():
    config = ModelConfig()
    model = EfficientDiT(config)
    for w in config.widths:
        dense = extract_width(model, w)
        assert dense.down[0].cross.k.weight.shape[1] == config.text_dim
    assert set(model.down[0].norm_cross.weight.keys()) == {"w0_375", "w0_5", "w1_0"}


@pytest.mark.parametrize("width", [0.3, 0.4, 0.0, 1.5])
def test_width_that_does_not_divide_is_a_clear_error(width):
    with pytest.raises(EdgeCompileError, match="width"):
        ModelConfig().dims(width)


def test_paper_scale_recipe_matches_paper_parameter_counts():
    config = ModelConfig.load("recipes/snapgenpp.yaml")
    for w, target in [(0.375, 0.3e9), (0.5, 0.4e9), (1.0, 1.6e9)]:
        assert abs(count_params(config, w) / target - 1) <= 0.10


def test_sampler_denoises_towards_data_with_an_oracle_velocity():
    from edgecompile.model.sampling import euler_sample

    x0 = torch.randn(3, 1, 8, 8)
    noise = torch.randn(3, 1, 8, 8)
    # Along the straight path x_t = (1-t) x0 + t eps the exact velocity is eps - x0 = (x_t - x0) / t.
    oracle = lambda x, t, c: (x - x0) / t.view(-1, 1, 1, 1)  # noqa: E731
    torch.testing.assert_close(euler_sample(oracle, noise, torch.zeros(3, 1, 1), steps=4), x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 64])
def test_gqa_attention_is_the_plain_formula_for_small_and_large_heads(head_dim):
    """From FUSED_ATTENTION_HEAD_DIM on, gqa_attention runs torch's fused kernel: the same sums, with GQA, a
    neighbourhood mask and a text bias, as the plain softmax formula."""
    g = torch.Generator().manual_seed(head_dim)
    b, hq, hkv, lq, lk = 2, 4, 2, 12, 10
    q, k, v = (torch.randn(b, h, n, head_dim, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    mask = torch.rand(lq, lk, generator=g) > 0.3
    mask[:, 0] = True  # every query attends somewhere
    bias = torch.where(torch.rand(b, lk, generator=g) > 0.2, 0.0, -10000.0)
    rep = hq // hkv
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~mask, float("-inf")) + bias[:, None, None, :]
    want = scores.softmax(-1) @ v.repeat_interleave(rep, 1)
    torch.testing.assert_close(gqa_attention(q, k, v, mask=mask, bias=bias), want, atol=1e-5, rtol=1e-5)
    per_batch = mask.repeat(b, 1, 1)[:, None, None]  # (B, 1, 1, Lq, Lk): how blockwise_neighbourhood_attention passes it
    torch.testing.assert_close(gqa_attention(q, k, v, mask=per_batch, bias=bias), want, atol=1e-5, rtol=1e-5)

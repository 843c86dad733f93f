"""The reference elastic efficient DiT of SnapGen++ (§3.1, §3.2), in the ordinary training layout (B, L, D).

One supernetwork holds the full-width weights. Running it at width w slices every attention / FFN projection
to its leading rows and columns (heads stay whole because head_dim is fixed); the cross-attention key/value
projections keep their full text input; LayerNorm and adaLN modulation parameters are stored once per width.
`edgecompile.model.elastic.extract_width` turns one width into a standalone dense model of this same class.

Blocks: self-attention -> cross-attention to text tokens -> FFN, with adaLN-single timestep modulation
(PixArt-alpha). Down/up self-attention is ASSA: a global branch over 2x2-conv-compressed keys/values (eq. 1)
and blockwise neighbourhood attention (eq. 2-3), mixed per head by an input-dependent sigmoid gate.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from edgecompile.model.config import PlannedBlock, ModelConfig, WidthDims, width_key


# ---------------------------------------------------------------------------------------------------
# Elastic building blocks: full-width parameters, sliced at call time.
# ---------------------------------------------------------------------------------------------------
class ElasticLinear(nn.Module):
    """nn.Linear whose weight is sliced to the leading rows/cols of each of its groups.

    Groups exist where a weight packs several width-sized chunks side by side (the 6 adaLN chunks of
    t_block, the [x, skip] halves of a U-ViT skip fusion): each chunk is sliced on its own.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, in_groups: int = 1, out_groups: int = 1):
        super().__init__()
        self.in_groups, self.out_groups = in_groups, out_groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.xavier_uniform_(self.weight)

    def sliced(self, in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        og, ig = self.out_groups, self.in_groups
        full_out, full_in = self.weight.shape
        w = self.weight.view(og, full_out // og, ig, full_in // ig)[:, : out_f // og, :, : in_f // ig]
        b = None if self.bias is None else self.bias.view(og, -1)[:, : out_f // og].reshape(out_f)
        return w.reshape(out_f, in_f), b

    def forward(self, x: torch.Tensor, in_f: int, out_f: int) -> torch.Tensor:
        return F.linear(x, *self.sliced(in_f, out_f))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


@functools.lru_cache(maxsize=64)
def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """(h*w, dim) fixed 2-D sin-cos positions for any grid (MAE style): one checkpoint, any aspect ratio.

    Cached: a constant of the grid, so a traced graph sees one tensor rather than the ops that built it."""
    with torch.device("cpu"):
        return _sincos_2d(h, w, dim)


def _sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double().reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([one_axis(gy, dim // 2), one_axis(gx, dim // 2)], dim=1).float()


def timestep_frequencies(dim: int, prediction: str = "flow") -> torch.Tensor:
    """The dim/2 angular frequencies of the sinusoidal timestep features.

    "flow" (t in [0, 1]): DiT/PixArt's t*1000 scaling folded in, computed in float64. "epsilon" (t in DDPM
    steps): diffusers' `get_timestep_embedding` exactly, float32 exponent and all, so that an imported model's
    features are bit-identical to diffusers' (a rounding step apart, t ~ 999 would move them by 1e-4 rad)."""
    half = dim // 2
    if prediction == "flow":
        return (torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half) * 1000).float()
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32)
    return torch.exp(exponent / half)


def timestep_features(t: torch.Tensor, dim: int, prediction: str = "flow") -> torch.Tensor:
    """Sinusoidal features [cos, sin] of t (flow: t in [0, 1], scaled to 0..1000 as DiT/PixArt do)."""
    t = t if t.dtype == torch.float64 and prediction == "flow" else t.float()
    freqs = timestep_frequencies(dim, prediction).to(t)
    args = t[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


@functools.lru_cache(maxsize=64)
def pixart_sincos_2d(h: int, w: int, dim: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """(h*w, dim) positions in diffusers' convention (`get_2d_sincos_pos_embed`), op for op: grid coordinates
    scaled to `base_size` and divided by `interpolation_scale`, the column coordinate in the first half."""
    with torch.device("cpu"):
        grid_h = torch.arange(h, dtype=torch.float32) / (h / base_size) / interpolation_scale
        grid_w = torch.arange(w, dtype=torch.float32) / (w / base_size) / interpolation_scale
        gw, gh = torch.meshgrid(grid_w, grid_h, indexing="xy")  # each (h, w)

        def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
            omega = torch.arange(d // 2, dtype=torch.float64)
            omega /= d / 2.0
            out = torch.outer(pos.reshape(-1), 1.0 / 10000**omega)
            return torch.cat([out.sin(), out.cos()], dim=1)

        return torch.cat([one_axis(gw, dim // 2), one_axis(gh, dim // 2)], dim=1).float()


def position_table(config: ModelConfig, h: int, w: int, dim: int) -> torch.Tensor:
    """(h*w, dim) position embeddings of an h x w token grid, in the config's convention."""
    if config.position_table == "pixart":
        return pixart_sincos_2d(h, w, dim, config.position_base_size or h, config.position_interpolation_scale)
    return sincos_2d(h, w, dim)


class PerWidthLayerNorm(nn.Module):
    """LayerNorm whose affine parameters are kept separately for each width (§3.2: 'isolated')."""

    def __init__(self, config: ModelConfig, affine: bool = True):
        super().__init__()
        self.affine = affine
        if affine:
            self.weight = nn.ParameterDict({width_key(w): nn.Parameter(torch.ones(config.dims(w).hidden)) for w in config.widths})
            self.bias = nn.ParameterDict({width_key(w): nn.Parameter(torch.zeros(config.dims(w).hidden)) for w in config.widths})

    def forward(self, x: torch.Tensor, d: WidthDims) -> torch.Tensor:
        if not self.affine:
            return F.layer_norm(x, (d.hidden,), eps=1e-6)
        k = width_key(d.width)
        return F.layer_norm(x, (d.hidden,), self.weight[k], self.bias[k], eps=1e-6)


def per_width_table(config: ModelConfig, rows: int) -> nn.ParameterDict:
    """adaLN-single scale/shift table (rows, D_w), one per width."""
    return nn.ParameterDict(
        {width_key(w): nn.Parameter(torch.randn(rows, config.dims(w).hidden) / config.dims(w).hidden ** 0.5) for w in config.widths}
    )


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------
FUSED_ATTENTION_HEAD_DIM = 64  # from this head size on, gqa_attention uses torch's fused kernel (a paper-scale verify's
# reference spent 20 s of 49 s in the plain formula's score tensors)


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, Lq, d), k/v (B, Hkv, Lk, d): query head i reads key/value head i // (Hq / Hkv).

    Plain softmax(q k^T / sqrt(d)) v, broadcasting each key/value head over its query group: with small heads
    it is faster on CPU than the fused kernels, and it is the formula the deploy rewrite reproduces; from
    FUSED_ATTENTION_HEAD_DIM on, torch's fused kernel computes the same sums. `mask` boolean, True = may attend:
    (Lq, Lk), or (B, Hkv or 1, group or 1, Lq, Lk); `bias` (B, Lk) is added to every query's scores of each key
    (a text padding mask).
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if d >= FUSED_ATTENTION_HEAD_DIM:  # large heads (the paper config's 256): the fused kernel, no (Lq, Lk) scores held
        extra = None
        if mask is not None:
            if mask.dim() == 5:  # (B, Hkv, group, Lq, Lk), the plain formula's layout -> (B, Hq, Lq, Lk): head kv * group + g
                mask = mask.flatten(1, 2)
            extra = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        if bias is not None:
            extra = (0 if extra is None else extra) + bias[:, None, None, :].to(q.dtype)  # (B, 1, 1, Lk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=extra, enable_gqa=int(hq) != int(hkv))  # ints: traced shapes are tensors
    qg = q.view(b, hkv, hq // hkv, lq, d)
    scores = (qg * d**-0.5) @ k[:, :, None].transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if bias is not None:
        scores = scores + bias[:, None, None, None, :]  # (B, 1, 1, 1, Lk) over (B, Hkv, group, Lq, Lk)
    return (scores.softmax(dim=-1) @ v[:, :, None]).view(b, hq, lq, d)


TEXT_MASK_VALUE = -10000.0  # what diffusers adds to the scores of a masked text token (encoder_attention_mask)


def text_mask_bias(text_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1/0 mask -> (B, T) additive score bias: 0 for a token, -10000 for padding (diffusers' convention)."""
    return None if text_mask is None else (1.0 - text_mask.float()) * TEXT_MASK_VALUE


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@functools.lru_cache(maxsize=64)
def bna_partition(config: ModelConfig, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise neighbourhood layout for an h x w token grid.

    Returns (order, neighbours): `order` (L,) lists token indices block by block (block-major), so block b
    is order[b*Nb:(b+1)*Nb]; `neighbours` (B, K) lists each block's neighbour blocks N_r(b), padded with -1.
    Sequence tiling (eq. 2): blocks are contiguous runs of the flat sequence, neighbours b-r..b+r.
    Grid tiling (supp. D): blocks are rectangles of the 2-D grid, neighbours within Chebyshev distance r,
    so B=16, r=1 gives each block its 3x3 = 9 spatial neighbour blocks.
    """
    with torch.device("cpu"):  # cached constants: never build them on the meta device of a caller's context
        return _bna_partition(config, h, w)


def _bna_partition(config: ModelConfig, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_blocks, r = config.bna_blocks, config.bna_radius
    if config.bna_tiling == "sequence":
        order = torch.arange(h * w)
        coords = [(b,) for b in range(n_blocks)]
    else:
        rows, cols = config.bna_block_grid(h, w)
        bh, bw = h // rows, w // cols
        order = torch.arange(h * w).view(rows, bh, cols, bw).permute(0, 2, 1, 3).reshape(-1)
        coords = [(i, j) for i in range(rows) for j in range(cols)]
    nbrs = [[c for c, cc in enumerate(coords) if max(abs(a - b) for a, b in zip(cc, coords[b_])) <= r] for b_ in range(n_blocks)]
    k = max(len(n) for n in nbrs)
    neighbours = torch.full((n_blocks, k), -1, dtype=torch.long)
    for b_, n in enumerate(nbrs):
        neighbours[b_, : len(n)] = torch.tensor(n)
    return order, neighbours


@functools.lru_cache(maxsize=64)
def bna_mask(config: ModelConfig, h: int, w: int) -> torch.Tensor:
    """(L, L) boolean mask of eq. 3 in token order: True where query i may attend to key j."""
    order, neighbours = bna_partition(config, h, w)
    n_blocks = neighbours.shape[0]
    block_of = torch.empty(h * w, dtype=torch.long, device="cpu")
    block_of[order] = torch.arange(n_blocks, device="cpu").repeat_interleave(h * w // n_blocks)
    allowed = torch.zeros(n_blocks, n_blocks, dtype=torch.bool, device="cpu")
    for b_ in range(n_blocks):
        allowed[b_, neighbours[b_][neighbours[b_] >= 0]] = True
    return allowed[block_of[:, None], block_of[None, :]]


@functools.lru_cache(maxsize=64)
def bna_token_order(config: ModelConfig, h: int, w: int) -> torch.Tensor:
    """(L,) the inverse of bna_partition's `order`: position of each token in the block-major sequence."""
    order, _ = bna_partition(config, h, w)
    with torch.device("cpu"):
        return torch.argsort(order)


@functools.lru_cache(maxsize=64)
def bna_valid_keys(config: ModelConfig, h: int, w: int) -> torch.Tensor:
    """(n_blocks, 1, K*Nb) boolean: which of each block's concatenated neighbour keys are real (not padding).
    A cached constant, so that a trace holds it as one (coremltools cannot convert the repeat_interleave)."""
    _, neighbours = bna_partition(config, h, w)
    with torch.device("cpu"):
        return (neighbours >= 0).repeat_interleave(h * w // neighbours.shape[0], dim=1)[:, None, :]


def blockwise_neighbourhood_attention(config: ModelConfig, q, k, v, h: int, w: int) -> torch.Tensor:
    """Eq. 3: each query block attends to the concatenated key/value blocks of its neighbourhood.

    q (B, Hq, L, d), k/v (B, Hkv, L, d) in token order; returns (B, Hq, L, d) in token order.
    """
    order, neighbours = bna_partition(config, h, w)
    n_blocks, kmax = neighbours.shape
    bsz, hq, length, d = q.shape
    nb = length // n_blocks

    def blocks(x):  # (B, H, L, d) -> (B, H, n_blocks, Nb, d), block-major
        return x[:, :, order].reshape(x.shape[0], x.shape[1], n_blocks, nb, d)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    idx = neighbours.clamp(min=0)
    kn = kb[:, :, idx].reshape(bsz, k.shape[1], n_blocks, kmax * nb, d)  # neighbour keys, concatenated
    vn = vb[:, :, idx].reshape(bsz, v.shape[1], n_blocks, kmax * nb, d)
    valid = bna_valid_keys(config, h, w)  # (n_blocks, 1, K*Nb)
    # Fold the blocks into the batch axis so each block is one independent attention.
    fold = lambda x: x.transpose(1, 2).reshape(bsz * n_blocks, x.shape[1], x.shape[3], d)  # noqa: E731
    out = gqa_attention(fold(qb), fold(kn), fold(vn), mask=None if bool(valid.all()) else valid.repeat(bsz, 1, 1)[:, None, None])
    out = out.view(bsz, n_blocks, hq, nb, d).transpose(1, 2).reshape(bsz, hq, length, d)
    return out[:, :, bna_token_order(config, h, w)]  # block-major -> token order: a gather (coremltools converts no scatter)


DENSE_BNA_MAX_TOKENS = 256


class SelfAttention(nn.Module):
    """GQA self-attention; `sparse=True` makes it ASSA (global over compressed KV + BNA, gated per head)."""

    def __init__(self, config: ModelConfig, sparse: bool):
        super().__init__()
        c = config
        self.config, self.sparse = c, sparse
        full = c.dims(1.0)
        self.q = ElasticLinear(full.hidden, full.attn_dim)
        self.k = ElasticLinear(full.hidden, full.kv_dim)
        self.v = ElasticLinear(full.hidden, full.kv_dim)
        self.out = ElasticLinear(full.attn_dim, full.hidden)
        if sparse:
            s = c.kv_compression
            # Depthwise 2x2 stride-2 conv on the k and v maps (eq. 1; depthwise as in PixArt-Sigma's KV
            # compression): cheap, and elastic by plain channel slicing.
            self.k_compress = nn.Conv2d(full.kv_dim, full.kv_dim, s, stride=s, groups=full.kv_dim)
            self.v_compress = nn.Conv2d(full.kv_dim, full.kv_dim, s, stride=s, groups=full.kv_dim)
            self.gate = ElasticLinear(full.hidden, full.heads)

    def forward(self, x: torch.Tensor, d: WidthDims, grid: tuple[int, int]) -> torch.Tensor:
        q = split_heads(self.q(x, d.hidden, d.attn_dim), d.heads)
        k_flat = self.k(x, d.hidden, d.kv_dim)
        v_flat = self.v(x, d.hidden, d.kv_dim)
        k, v = split_heads(k_flat, d.kv_heads), split_heads(v_flat, d.kv_heads)
        if not self.sparse:
            return self.out(merge_heads(gqa_attention(q, k, v)), d.attn_dim, d.hidden)
        h, w = grid
        kc = split_heads(self.compress(self.k_compress, k_flat, d, h, w), d.kv_heads)
        vc = split_heads(self.compress(self.v_compress, v_flat, d, h, w), d.kv_heads)
        global_out = gqa_attention(q, kc, vc)
        if h * w <= DENSE_BNA_MAX_TOKENS:  # short sequences: one masked dense attention is cheaper than gathers
            local_out = gqa_attention(q, k, v, mask=bna_mask(self.config, h, w))
        else:
            local_out = blockwise_neighbourhood_attention(self.config, q, k, v, h, w)
        g = torch.sigmoid(self.gate(x, d.hidden, d.heads)).transpose(1, 2)[..., None]  # (B, Hq, L, 1)
        mixed = g * global_out + (1 - g) * local_out
        return self.out(merge_heads(mixed), d.attn_dim, d.hidden)

    @staticmethod
    def compress(conv: nn.Conv2d, tokens: torch.Tensor, d: WidthDims, h: int, w: int) -> torch.Tensor:
        b, n, c = tokens.shape
        maps = tokens.transpose(1, 2).reshape(b, c, h, w)
        out = F.conv2d(maps, conv.weight[:c], conv.bias[:c], stride=conv.stride, groups=c)
        return out.flatten(2).transpose(1, 2)


class CrossAttention(nn.Module):
    """Queries from the image tokens; keys/values from text tokens (B, T, text_dim), whose input is never sliced."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        full = config.dims(1.0)
        self.q = ElasticLinear(full.hidden, full.attn_dim)
        self.text_dim = full.hidden if config.caption_projection else config.text_dim  # what k and v read
        self.k = ElasticLinear(self.text_dim, full.kv_dim)
        self.v = ElasticLinear(self.text_dim, full.kv_dim)
        self.out = ElasticLinear(full.attn_dim, full.hidden)

    def forward(self, x: torch.Tensor, text: torch.Tensor, d: WidthDims, text_bias: torch.Tensor | None = None) -> torch.Tensor:
        q = split_heads(self.q(x, d.hidden, d.attn_dim), d.heads)
        k = split_heads(self.k(text, self.text_dim, d.kv_dim), d.kv_heads)
        v = split_heads(self.v(text, self.text_dim, d.kv_dim), d.kv_heads)
        return self.out(merge_heads(gqa_attention(q, k, v, bias=text_bias)), d.attn_dim, d.hidden)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, middle: bool):
        super().__init__()
        full = config.dims(1.0)
        self.middle = middle
        inner = full.ffn_middle if middle else full.ffn_outer
        self.fc1 = ElasticLinear(full.hidden, inner)
        self.fc2 = ElasticLinear(inner, full.hidden)

    def forward(self, x: torch.Tensor, d: WidthDims) -> torch.Tensor:
        inner = d.ffn_middle if self.middle else d.ffn_outer
        return self.fc2(F.gelu(self.fc1(x, d.hidden, inner), approximate="tanh"), inner, d.hidden)


class DiTBlock(nn.Module):
    """Self-attention -> cross-attention -> FFN with adaLN-single modulation (PixArt-alpha)."""

    def __init__(self, config: ModelConfig, planned: PlannedBlock):
        super().__init__()
        self.stage = stage = planned.stage
        full = config.dims(1.0)
        # U-ViT long skip: cat([x, skip]) -> linear, sliced per half.
        self.skip_fuse = ElasticLinear(2 * full.hidden, full.hidden, in_groups=2) if planned.reads_skip else None
        self.norm1 = PerWidthLayerNorm(config, affine=False)
        self.attn = SelfAttention(config, sparse=planned.sparse)
        self.norm_cross = PerWidthLayerNorm(config, affine=True) if config.cross_attention_norm else None
        self.cross = CrossAttention(config)
        self.norm2 = PerWidthLayerNorm(config, affine=False)
        self.ffn = FeedForward(config, middle=stage == "middle")
        self.scale_shift_table = per_width_table(config, 6)

    def forward(self, x, t0, text, d: WidthDims, grid, skip=None, text_bias=None):
        if self.skip_fuse is not None:
            x = self.skip_fuse(torch.cat([x, skip], dim=-1), 2 * d.hidden, d.hidden)
        mod = self.scale_shift_table[width_key(d.width)][None] + t0.view(t0.shape[0], 6, d.hidden)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m[:, None] for m in mod.unbind(1))
        x = x + gate_sa * self.attn(modulate(self.norm1(x, d), shift_sa, scale_sa), d, grid)
        x = x + self.cross(self.norm_cross(x, d) if self.norm_cross is not None else x, text, d, text_bias)
        x = x + gate_ff * self.ffn(modulate(self.norm2(x, d), shift_ff, scale_ff), d)
        return x


class EfficientDiT(nn.Module):
    """Rectified-flow velocity predictor v(x_t, t, text) (eq. 4). Latent (B, C, H, W) in, velocity out.

    The same class holds imported families (model/importers): config options give it PixArt's parts (no stages
    or skips, no norm before cross-attention, a caption projection, micro-conditions, diffusers' position table,
    epsilon prediction with DDPM timesteps)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.narrowed_to: float | None = None  # model/elastic.narrow_to_width: the largest width it still holds
        full = c.dims(1.0)
        p = c.patch_size
        self.patch_embed = nn.Conv2d(c.latent_channels, full.hidden, p, stride=p)
        self.t_mlp1 = ElasticLinear(c.frequency_dim, full.hidden)
        self.t_mlp2 = ElasticLinear(full.hidden, full.hidden)
        self.t_block = ElasticLinear(full.hidden, 6 * full.hidden, out_groups=6)  # adaLN-single, shared by all blocks
        if c.micro_conditions:  # PixArt-alpha: the image's resolution and aspect ratio, each embedded like a timestep
            third = full.hidden // 3
            self.res_mlp1, self.res_mlp2 = ElasticLinear(c.frequency_dim, third), ElasticLinear(third, third)
            self.ar_mlp1, self.ar_mlp2 = ElasticLinear(c.frequency_dim, third), ElasticLinear(third, third)
        if c.caption_projection:  # PixArt: text_dim -> hidden MLP applied to the text tokens once
            self.caption_proj1 = ElasticLinear(c.text_dim, full.hidden)
            self.caption_proj2 = ElasticLinear(full.hidden, full.hidden)
        self.plan = plan = c.block_plan()
        for stage in ("down", "middle", "up"):
            setattr(self, stage, nn.ModuleList(DiTBlock(c, b) for b in plan.blocks if b.stage == stage))
        if c.stage_downsample:
            self.downsample = nn.Conv2d(full.hidden, full.hidden, 2, stride=2)
            self.upsample = nn.ConvTranspose2d(full.hidden, full.hidden, 2, stride=2)
        self.final_norm = PerWidthLayerNorm(c, affine=False)
        self.final_table = per_width_table(c, 2)
        self.final = ElasticLinear(full.hidden, p * p * c.latent_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # Zero the residual-branch outputs and the final projection (DiT's adaLN-zero spirit): training
        # starts from an identity network, which is what makes the small default model train in minutes.
        for blk in [*self.down, *self.middle, *self.up]:
            for lin in (blk.attn.out, blk.cross.out, blk.ffn.fc2):
                nn.init.zeros_(lin.weight)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    @property
    def n_skips(self) -> int:
        return self.plan.n_skips

    def micro_condition(self, latent_h: int, latent_w: int) -> torch.Tensor:
        """(1, D) embedding of the image's size in pixels [H, W] and aspect ratio H / W (PixArt-alpha): a constant
        of the latent size, added to the timestep embedding."""
        c = self.config
        hidden = self.t_mlp2.weight.shape[0]
        third = hidden // 3
        px_h, px_w = latent_h * c.vae_scale_factor, latent_w * c.vae_scale_factor
        device = self.t_mlp1.weight.device
        res = timestep_features(torch.tensor([px_h, px_w], dtype=torch.float32, device=device), c.frequency_dim, "epsilon")
        ar = timestep_features(torch.tensor([px_h / px_w], dtype=torch.float32, device=device), c.frequency_dim, "epsilon")
        res_emb = self.res_mlp2(F.silu(self.res_mlp1(res, c.frequency_dim, third)), third, third).reshape(1, -1)
        ar_emb = self.ar_mlp2(F.silu(self.ar_mlp1(ar, c.frequency_dim, third)), third, third)
        return torch.cat([res_emb, ar_emb], dim=1)

    def project_text(self, text: torch.Tensor, d: WidthDims) -> torch.Tensor:
        if not self.config.caption_projection:
            return text
        c = self.config
        return self.caption_proj2(F.gelu(self.caption_proj1(text, c.text_dim, d.hidden), approximate="tanh"), d.hidden, d.hidden)

    def check_width(self, width: float) -> None:
        """Refuse a width this model no longer holds (loaded for smaller widths only)."""
        if self.narrowed_to is not None and width > self.narrowed_to:
            raise ValueError(f"this model holds widths up to {self.narrowed_to:g} only (loaded for them): width {width:g} "
                             "needs the whole checkpoint, load_checkpoint(path) without `width`")

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, width: float = 1.0,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`text_mask` (B, T): 1 for a token, 0 for padding (configs with text_mask; None attends to every token)."""
        self.check_width(width)
        c = self.config
        text_bias = text_mask_bias(text_mask)
        d = c.dims(width)
        bsz, lh, lw = x.shape[0], int(x.shape[2]), int(x.shape[3])  # plain ints: shapes are static per export
        c.check_latent_size(lh, lw)
        h, w = c.token_grid(lh, lw)
        p = c.patch_size

        tok = F.conv2d(x, self.patch_embed.weight[: d.hidden], self.patch_embed.bias[: d.hidden], stride=p)
        tok = tok.flatten(2).transpose(1, 2) + position_table(c, h, w, d.hidden).to(x)
        tfeat = timestep_features(t, c.frequency_dim, c.prediction)
        temb = self.t_mlp2(F.silu(self.t_mlp1(tfeat, c.frequency_dim, d.hidden)), d.hidden, d.hidden)
        if c.micro_conditions:
            temb = temb + self.micro_condition(lh, lw).to(temb)
        t0 = self.t_block(F.silu(temb), d.hidden, 6 * d.hidden)
        text = self.project_text(text, d)

        grid, hi_res, skips = (h, w), None, []  # skips: U-ViT's, the first middle blocks feed the last, innermost first
        for pos in range(len(self.plan) + 1):
            down, up = self.plan.transitions_before(pos)
            if down:  # hourglass: the middle stage runs at half resolution
                hi_res = tok
                maps = tok.transpose(1, 2).reshape(bsz, d.hidden, h, w)
                wgt = self.downsample.weight[: d.hidden, : d.hidden]
                tok = F.conv2d(maps, wgt, self.downsample.bias[: d.hidden], stride=2).flatten(2).transpose(1, 2)
                grid = (h // 2, w // 2)
            if up:
                maps = tok.transpose(1, 2).reshape(bsz, d.hidden, *grid)
                wgt = self.upsample.weight[: d.hidden, : d.hidden]
                tok = F.conv_transpose2d(maps, wgt, self.upsample.bias[: d.hidden], stride=2).flatten(2).transpose(1, 2) + hi_res
                grid = (h, w)
            if pos == len(self.plan):
                break
            b = self.plan.blocks[pos]
            tok = getattr(self, b.stage)[b.index](tok, t0, text, d, grid, skip=skips.pop() if b.reads_skip else None, text_bias=text_bias)
            if b.writes_skip:
                skips.append(tok)

        shift, scale = (self.final_table[width_key(d.width)][None] + temb[:, None]).unbind(1)
        tok = modulate(self.final_norm(tok, d), shift[:, None], scale[:, None])
        out = self.final(tok, d.hidden, p * p * c.latent_channels)  # (B, L, p*p*C)
        out = out.view(bsz, h, w, p, p, c.latent_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(bsz, c.latent_channels, lh, lw)


@torch.no_grad()
def randomize_untrained(model: EfficientDiT, seed: int = 0, std: float = 0.02) -> EfficientDiT:
    """Give the zero-initialised residual branches random weights so an untrained model computes something
    (for `edgecompile init`, scale benchmarks and tests)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim >= 1 and not p.abs().any():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model

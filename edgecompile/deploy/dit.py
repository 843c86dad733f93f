"""The ANE-layout rewrite of a dense (one-width) EfficientDiT (SnapGen++ supplementary C).

Layout tricks, each justified where it is used:
- Activations stay 4-D with channels at axis 1: (B, C, H, W) maps, or (B, C, 1, S) for a flat sequence
  (ml-ane-transformers: the ANE tiles the last axis; channels-third-from-last avoids layout copies).
- Every nn.Linear is a 1x1 nn.Conv2d; LayerNorm reduces over axis 1.
- Split-einsum attention: per head, q and v are channel slices; k is transposed once per attention branch
  to (B, S, 1, C) so that scores are `einsum("bchq,bkhc->bkhq")` with softmax over axis 1.
- Grid BNA: the token map is kept in *block-column layout* through the down/up stages: the bx column strips of
  the grid are stacked vertically, (B, C, bx*h, bw). Every BNA block (bh x bw tokens) is then a contiguous run of
  the flattened sequence, a block's neighbourhood is 2r+1 contiguous runs, and every 2x2 stride-2 convolution
  (KV compression, downsample, upsample) stays inside its strip when the strip width is even, so it computes
  exactly what it does on the plain grid (odd strips: those convolutions read the raster map). Entering and
  leaving this layout costs slices and one concat, no transpose.
- BNA puts the blocks on the einsum's h axis, (B, C, n_blocks, nb), and a block's neighbourhood is its K shifts
  of that axis (slices of one circularly padded tensor, concatenated on the key axis, the missing neighbours
  masked): one einsum pair per head for the whole layer, where a loop over blocks took one per head and block
  (issue 29: the bundled model's width-0.5 program has 4.5x fewer ops, benchmarks/graph_census.py).
- Graphs that only run in torch (the sweep's and distillation's teacher and student, verification's references)
  compute the same attention with batched kernels (deploy/fused_attention.py, `DeployDiT.fuse_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from edgecompile.deploy.fused_attention import fused_attention, fused_bna, neighbour_table
from edgecompile.model.config import ModelConfig, PlannedBlock
from edgecompile.model.dit import bna_partition, position_table, timestep_frequencies, text_mask_bias

NEG_INF = -1e4  # fp16-safe "minus infinity" for masks


def conv1x1(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias)


class LayerNormANE(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), optional per-channel affine."""

    def __init__(self, channels: int, affine: bool, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Principle: normalise over the channel axis (axis 1) of (B, C, H, W); no transpose to (B, L, D)
        mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        zero_mean = x - mean  # (B, C, H, W)
        out = zero_mean * torch.rsqrt((zero_mean * zero_mean).mean(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def split_einsum_attention(q, k_t, v, heads: int, kv_heads: int, head_dim: int, query_chunk: int | None = None,
                           q_scaled: bool = False, bias: torch.Tensor | None = None, scores_bias: torch.Tensor | None = None):
    """Per-head attention in ANE layout.

    q (B, Hq*d, G, Sq), k_t (B, Sk, G, Hkv*d) (already transposed), v (B, Hkv*d, G, Sk) -> (B, Hq*d, G, Sq): G
    independent groups on axis 2 (1 for a plain sequence; the BNA blocks, each against its own neighbourhood).
    Query head i reads key/value head i // (Hq / Hkv) (GQA: shared splits, no copies).
    `query_chunk` splits the query axis (Apple's SPLIT_EINSUM_V2);
    `q_scaled` says q already carries the 1/sqrt(d) factor (a caller sharing q between branches scales it once);
    `bias`, added to the scores before the softmax, is (B or 1, Hq or 1, Sk, Sq): a relative-position bias, a
    causal mask, a padding mask (text encoders); `scores_bias`, the same for every head, is laid out like the scores
    (B or 1, Sk, G or 1, Sq or 1) and added as it is (the BNA slots' mask).
    """
    group = heads // kv_heads
    if not q_scaled:
        q = q * head_dim**-0.5  # (B, Hq*d, 1, Sq): one op for all heads, the same values as scaling each head
    sq = q.shape[3]
    chunks = [(0, sq)] if not query_chunk or query_chunk >= sq else [(s, min(s + query_chunk, sq)) for s in range(0, sq, query_chunk)]
    # Principle: split heads along the channel axis (one split op per tensor, as ml-ane-transformers does),
    # not by a (B, H, S, d) reshape + transpose; one split instead of a slice per head keeps the graph small
    q_heads = q.split(head_dim, dim=1)  # Hq x (B, d, G, Sq)
    k_heads = k_t.split(head_dim, dim=3)  # Hkv x (B, Sk, G, d)
    v_heads = v.split(head_dim, dim=1)  # Hkv x (B, d, G, Sk)
    outs = []
    for i in range(heads):
        j = i // group  # GQA: query head i reads key/value head j (no repeat_kv copy)
        q_h, k_h, v_h = q_heads[i], k_heads[j], v_heads[j]
        pieces = []
        for s0, s1 in chunks:
            qc = q_h if len(chunks) == 1 else q_h[:, :, :, s0:s1]  # (B, d, 1, sq)
            # Principle: scores keep keys on axis 1, so softmax reduces over channels-first like every other op
            w = torch.einsum("bchq,bkhc->bkhq", qc, k_h)  # (B, Sk, G, sq)
            if scores_bias is not None:
                w = w + scores_bias  # (B, Sk, G, sq)
            if bias is not None:
                b = bias[:, i if bias.shape[1] > 1 else 0, :, s0:s1] if bias.shape[3] > 1 else bias[:, 0]  # (B or 1, Sk, sq or 1)
                w = w + b[:, :, None]  # (B, Sk, 1, sq): scores keep keys on axis 1
            w = w.softmax(dim=1)  # (B, Sk, G, sq)
            pieces.append(torch.einsum("bkhq,bchk->bchq", w, v_h))  # (B, d, G, sq)
        outs.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=3))  # (B, d, G, Sq)
    return torch.cat(outs, dim=1)  # (B, Hq*d, G, Sq): heads back on the channel axis


def separable_positions(pos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(rows (1, D, h, 1), cols (1, D, 1, w)) with rows + cols == pos exactly, when every channel of the (1, D, h, w)
    table varies along one axis only (2-D sin-cos tables); (None, None) otherwise."""
    along_rows = (pos == pos[:, :, :, :1]).all(dim=(2, 3))  # (1, D): constant across columns -> a row channel
    along_cols = (pos == pos[:, :, :1, :]).all(dim=(2, 3))
    if not bool((along_rows | along_cols).all()):
        return None, None
    rows = torch.where(along_rows[..., None, None], pos[:, :, :, :1], 0.0)
    cols = torch.where(along_rows[..., None, None], 0.0, pos[:, :, :1, :])
    if not torch.equal(rows + cols, pos):
        return None, None
    return rows, cols


class BlockLayout:
    """Where each BNA block and its neighbourhood sit in the flattened down/up-stage sequence."""

    def __init__(self, config: ModelConfig, h: int, w: int):
        self.config = config
        self.h, self.w = h, w
        self.grid = config.bna_tiling == "grid"
        if self.grid:
            self.rows, self.cols = config.bna_block_grid(h, w)
            self.bh, self.bw = h // self.rows, w // self.cols
            # A strip is bw tokens wide and h tall; 2x2 stride-2 windows stay inside it when bw is divisible by
            # the strides (h already is), so they see the same tokens as on the raster grid. Otherwise (e.g. an
            # 8x12 latent: blocks 3 tokens wide) the strided convolutions read the raster map (slices + a concat).
            self.strided_in_strips = self.bw % math.lcm(config.kv_compression, 2 if config.stage_downsample else 1) == 0
        else:
            self.strided_in_strips = True
        n_blocks = config.bna_blocks
        self.block_len = h * w // n_blocks
        _, neighbours = bna_partition(config, h, w)
        # per query block: (its deploy index, its neighbours' deploy indices, sorted: keys concatenate in sequence order)
        self.neighbour_blocks = [(self.deploy_index(b), sorted(self.deploy_index(int(n)) for n in neighbours[b] if n >= 0))
                                 for b in range(n_blocks)]
        self.neighbour_index, self.neighbour_mask = neighbour_table(self.neighbour_blocks, self.block_len)  # fused BNA only
        # Neighbourhoods as shifts of the block axis: slot o of block b holds block b + o (deploy order), masked where
        # b + o is not a neighbour of b. Grid blocks sit column-major, so neighbour (di, dj) is the same shift
        # dj * rows + di for every block: 9 slots for radius 1, 2r + 1 for sequence tiling.
        pairs = {(b, n) for b, ns in self.neighbour_blocks for n in ns}
        self.n_blocks = n_blocks
        self.slot_offsets = sorted({n - b for b, n in pairs})
        self.slot_pad = max(abs(o) for o in self.slot_offsets)  # < n_blocks
        valid = torch.tensor([[(b, b + o) in pairs for b in range(n_blocks)] for o in self.slot_offsets])  # (K, n_blocks)
        self.slot_bias = None if bool(valid.all()) else (
            torch.where(valid, 0.0, NEG_INF).repeat_interleave(self.block_len, dim=0)[None, :, :, None])  # (1, K*nb, n_blocks, 1)

    def deploy_index(self, ref_block: int) -> int:
        """Block number in the deploy sequence of the reference model's block `ref_block` (row-major blocks)."""
        if not self.grid:
            return ref_block
        i, j = divmod(ref_block, self.cols)
        return j * self.rows + i  # column strips stacked: column-major block order

    def neighbour_slots(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, *, n_blocks, *) -> one tensor per slot offset o, holding block b + o at position b of axis 2."""
        p = self.slot_pad
        if p == 0:
            return [x]
        # Principle: shifts of the block axis are slices of one circularly padded tensor (slices and a concat, no
        # gather); the wrapped-around blocks are never neighbours and the slot mask removes them
        padded = torch.cat([x[:, :, -p:], x, x[:, :, :p]], dim=2)  # (B, *, n_blocks + 2p, *)
        return [padded[:, :, p + o : p + o + self.n_blocks] for o in self.slot_offsets]  # K x (B, *, n_blocks, *)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) raster map -> (B, C, cols*h, bw) block-column layout (slices + one concat)."""
        if not self.grid or self.cols == 1:
            return x
        s = x.shape[3] // self.cols
        # Principle: a layout change made of slices and one concat, never a transpose
        return torch.cat([x[:, :, :, j * s : (j + 1) * s] for j in range(self.cols)], dim=2)  # (B, C, cols*h, bw)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grid or self.cols == 1:
            return x
        s = x.shape[2] // self.cols
        return torch.cat([x[:, :, j * s : (j + 1) * s] for j in range(self.cols)], dim=3)  # (B, C, h, w)

    def strided_input(self, x: torch.Tensor) -> torch.Tensor:
        """The map a 2x2 stride-2 convolution reads: the block layout itself when windows stay inside strips,
        else the raster map."""
        return x if self.strided_in_strips else self.from_blocks(x)  # (B, C, cols*h, bw) or (B, C, h, w)

    def strided_output(self, x: torch.Tensor) -> torch.Tensor:
        """Back from a strided convolution's layout (see strided_input) to the block layout."""
        return x if self.strided_in_strips else self.to_blocks(x)


class DeploySelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, sparse: bool, layout: BlockLayout | None, query_chunk: int | None):
        super().__init__()
        d = config.dims(1.0)
        self.d, self.sparse, self.layout, self.query_chunk = d, sparse, layout, query_chunk
        self.fused = False  # batched kernels for torch-only graphs (DeployDiT.fuse_attention); never converted
        self.q = conv1x1(d.hidden, d.attn_dim)
        self.k = conv1x1(d.hidden, d.kv_dim)
        self.v = conv1x1(d.hidden, d.kv_dim)
        self.out = conv1x1(d.attn_dim, d.hidden)
        if sparse:
            s = config.kv_compression
            self.k_compress = nn.Conv2d(d.kv_dim, d.kv_dim, s, stride=s, groups=d.kv_dim)
            self.v_compress = nn.Conv2d(d.kv_dim, d.kv_dim, s, stride=s, groups=d.kv_dim)
            self.gate = conv1x1(d.hidden, d.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.d
        b, c, hh, ww = x.shape
        flat = lambda m: m.reshape(b, m.shape[1], 1, -1)  # noqa: E731  (B, C, H, W) -> (B, C, 1, S): one reshape per tensor
        # Principle: every linear is a 1x1 conv on the channel axis
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, Hq*d, H, W), (B, Hkv*d, H, W) x2
        if not self.sparse:
            if self.fused:
                out = fused_attention(flat(q), flat(k).transpose(1, 3), flat(v), d.heads, d.kv_heads, d.head_dim)
            else:
                out = split_einsum_attention(flat(q), flat(k).transpose(1, 3), flat(v), d.heads, d.kv_heads, d.head_dim,
                                             query_chunk=self.query_chunk)
            return self.out(out).reshape(b, c, hh, ww)
        q_seq, k_seq, v_seq = flat(q) * d.head_dim**-0.5, flat(k), flat(v)  # (B, Hq*d, 1, S): q scaled once for both branches
        kc_t = flat(self.k_compress(self.layout.strided_input(k))).transpose(1, 3)  # (B, S/s^2, 1, Hkv*d): the global branch's key transpose
        vc = flat(self.v_compress(self.layout.strided_input(v)))  # (B, Hkv*d, 1, S/s^2): KV compression is a strided depthwise conv
        if self.fused:
            return self.out(self.fused_branches(x, q_seq, k_seq.transpose(1, 3), v_seq, kc_t, vc)).reshape(b, c, hh, ww)
        global_out = split_einsum_attention(q_seq, kc_t, vc, d.heads, d.kv_heads, d.head_dim, query_chunk=self.query_chunk,
                                            q_scaled=True)  # (B, Hq*d, 1, S)
        local_out = self.bna(q_seq, k_seq, v_seq)  # (B, Hq*d, 1, S)
        g = torch.sigmoid(flat(self.gate(x)))  # (B, Hq, 1, S): per token, per head
        # Principle: per-head gating on channel splits of (B, Hq*d, 1, S), concatenated back on the channel axis
        locals_, globals_ = local_out.split(d.head_dim, dim=1), global_out.split(d.head_dim, dim=1)  # Hq x (B, d, 1, S)
        g_heads, keep_heads = g.split(1, dim=1), (1 - g).split(1, dim=1)  # Hq x (B, 1, 1, S)
        mixed = torch.cat([locals_[i] * keep_heads[i] + globals_[i] * g_heads[i] for i in range(d.heads)], dim=1)  # (B, Hq*d, 1, S)
        return self.out(mixed).reshape(b, c, hh, ww)

    def fused_branches(self, x, q_seq, k_seq_t, v_seq, kc_t, vc) -> torch.Tensor:
        """The gated mix of BNA and global attention with batched kernels (fused graphs only): (B, Hq*d, 1, S)."""
        d, lay = self.d, self.layout
        b, s = q_seq.shape[0], q_seq.shape[3]
        global_out = fused_attention(q_seq, kc_t, vc, d.heads, d.kv_heads, d.head_dim, q_scaled=True)
        local_out = fused_bna(q_seq, k_seq_t, v_seq, d.heads, d.kv_heads, d.head_dim, lay.neighbour_index, lay.neighbour_mask)
        g = torch.sigmoid(self.gate(x)).reshape(b, d.heads, 1, s)  # (B, Hq, 1, S): per token, per head
        heads = lambda m: m.reshape(b, d.heads, d.head_dim, s)  # noqa: E731  (B, Hq*d, 1, S) -> (B, Hq, d, S)
        return (heads(local_out) * (1 - g) + heads(global_out) * g).reshape(b, d.heads * d.head_dim, 1, s)

    def bna(self, q_seq, k_seq, v_seq) -> torch.Tensor:
        """Eq. 3 with the blocks on axis 2: every block against its neighbourhood in one einsum pair per head. q_seq
        (already scaled), k_seq and v_seq are (B, C, 1, S) in block-column order; returns (B, Hq*d, 1, S)."""
        d, lay = self.d, self.layout
        b, s = q_seq.shape[0], q_seq.shape[3]
        nblk, nb = lay.n_blocks, lay.block_len
        # Principle: BNA blocks are the einsum's h axis. The block-column layout makes every block a contiguous run of
        # the sequence, so (B, C, 1, S) -> (B, C, n_blocks, nb) is a reshape; a block's neighbourhood is its K slots
        # (shifts of the block axis) concatenated along the key axis, and the einsums treat the blocks as independent
        # attentions: one einsum pair per head for the layer, not one per head and block
        q = q_seq.reshape(b, q_seq.shape[1], nblk, nb)  # (B, Hq*d, n_blocks, nb)
        k_t = k_seq.reshape(b, k_seq.shape[1], nblk, nb).transpose(1, 3)  # (B, nb, n_blocks, Hkv*d): the layer's BNA key transpose
        v = v_seq.reshape(b, v_seq.shape[1], nblk, nb)  # (B, Hkv*d, n_blocks, nb)
        keys = torch.cat(lay.neighbour_slots(k_t), dim=1)  # (B, K*nb, n_blocks, Hkv*d)
        values = torch.cat(lay.neighbour_slots(v), dim=3)  # (B, Hkv*d, n_blocks, K*nb)
        mask = lay.slot_bias
        if mask is not None and (mask.device, mask.dtype) != (q.device, q.dtype):  # a constant of the layout, made in fp32 on the
            mask = mask.to(q.device, q.dtype)  # CPU (static analysis runs on meta; an fp16 graph adds it in fp16)
        out = split_einsum_attention(q, keys, values, d.heads, d.kv_heads, d.head_dim, q_scaled=True,
                                     scores_bias=mask)  # (B, Hq*d, n_blocks, nb)
        return out.reshape(b, out.shape[1], 1, s)  # (B, Hq*d, 1, S) in deploy block order


class DeployCrossAttention(nn.Module):
    def __init__(self, config: ModelConfig, query_chunk: int | None):
        super().__init__()
        d = config.dims(1.0)
        self.d, self.query_chunk = d, query_chunk
        self.fused = False  # see DeploySelfAttention
        self.q = conv1x1(d.hidden, d.attn_dim)
        text_dim = d.hidden if config.caption_projection else config.text_dim  # k and v read the projected text
        self.k = conv1x1(text_dim, d.kv_dim)
        self.v = conv1x1(text_dim, d.kv_dim)
        self.out = conv1x1(d.attn_dim, d.hidden)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_bias: torch.Tensor | None = None) -> torch.Tensor:
        d = self.d
        b, c, hh, ww = x.shape
        q = self.q(x).reshape(b, d.attn_dim, 1, hh * ww)  # (B, Hq*d, 1, S)
        k_t = self.k(text).transpose(1, 3)  # (B, text_dim, 1, T) -> (B, T, 1, Hkv*d): the layer's one key transpose
        if self.fused:
            out = fused_attention(q, k_t, self.v(text), d.heads, d.kv_heads, d.head_dim, bias=text_bias)
        else:
            out = split_einsum_attention(q, k_t, self.v(text), d.heads, d.kv_heads, d.head_dim, query_chunk=self.query_chunk,
                                         bias=text_bias)  # text_bias (B, 1, T, 1): the same for every head and query
        return self.out(out).reshape(b, c, hh, ww)


class DeployFeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = conv1x1(hidden, inner)
        self.fc2 = conv1x1(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DeployBlock(nn.Module):
    def __init__(self, config: ModelConfig, planned: PlannedBlock, layout: BlockLayout | None, query_chunk: int | None):
        super().__init__()
        d = config.dims(1.0)
        self.hidden = d.hidden
        inner = d.ffn_middle if planned.stage == "middle" else d.ffn_outer
        self.skip_fuse = conv1x1(2 * d.hidden, d.hidden) if planned.reads_skip else None
        self.norm1 = LayerNormANE(d.hidden, affine=False)
        self.attn = DeploySelfAttention(config, planned.sparse, layout if planned.sparse else None, query_chunk)
        self.norm_cross = LayerNormANE(d.hidden, affine=True) if config.cross_attention_norm else nn.Identity()
        self.cross = DeployCrossAttention(config, query_chunk)
        self.norm2 = LayerNormANE(d.hidden, affine=False)
        self.ffn = DeployFeedForward(d.hidden, inner)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6 * d.hidden, 1, 1))

    def forward(self, x, t0, text, skip=None, text_bias=None):
        if self.skip_fuse is not None:
            x = self.skip_fuse(torch.cat([x, skip], dim=1))
        # Modulation broadcasts over (H, W) in channel layout: (B, D, 1, 1) chunks.
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.scale_shift_table + t0).chunk(6, dim=1)
        x = x + gate_sa * self.attn(self.norm1(x) * (1 + scale_sa) + shift_sa)
        x = x + self.cross(self.norm_cross(x), text, text_bias)
        return x + gate_ff * self.ffn(self.norm2(x) * (1 + scale_ff) + shift_ff)


@dataclass
class Carry:
    """The state between two blocks: the hidden map, the timestep's modulation (t0, for every block) and
    embedding (temb, for the head), and the skips still waiting for their reader."""

    x: torch.Tensor  # (B, D, H', W') in block layout
    t0: torch.Tensor  # (B, 6D, 1, 1)
    temb: torch.Tensor  # (B, D, 1, 1)
    hi_res: torch.Tensor | None = None  # the down stage's output, read by the up stage (stage_downsample)
    skips: list[torch.Tensor] = field(default_factory=list)  # middle-stage long skips, a stack


class DeployDiT(nn.Module):
    """Static-shape deploy graph of one width at one latent size.

    Inputs: latent (B, C, H, W), timestep (B,) in [0, 1], text (B, text_dim, 1, T). Output: velocity (B, C, H, W).
    """

    def __init__(self, config: ModelConfig, latent_hw: tuple[int, int], query_chunk: int | None = None):
        super().__init__()
        if config.widths != (1.0,):
            raise ValueError("DeployDiT takes a dense (extracted) config; use edgecompile.deploy.rewrite.deploy_model")
        config.check_latent_size(*latent_hw)
        self.config = c = config
        self.latent_hw = latent_hw
        d = c.dims(1.0)
        h, w = c.token_grid(*latent_hw)
        self.grid_hw = (h, w)
        self.plan = plan = c.block_plan()
        with torch.device("cpu"):
            self.layout = BlockLayout(c, h, w) if any(b.sparse for b in plan.blocks) else None
        p = c.patch_size
        self.patch_embed = nn.Conv2d(c.latent_channels, d.hidden, p, stride=p)
        with torch.device("cpu"):  # constants are computed even when the module is built on the meta device
            pos = position_table(c, h, w, d.hidden).T.reshape(1, d.hidden, h, w)
            pos_rows, pos_cols = separable_positions(pos)
            # Principle: a 2-D sin-cos table is a row part plus a column part (each channel reads one axis), so the
            # package stores D x (h + w) values, not D x h x w: at several latent sizes per package
            # (multifunction) the per-size constants stay small beside the shared weights
            self.register_buffer("pos_rows", pos_rows, persistent=False)  # (1, D, h, 1), zero in column channels
            self.register_buffer("pos_cols", pos_cols, persistent=False)  # (1, D, 1, w), zero in row channels
            self.register_buffer("pos", None if pos_rows is not None else self._to_layout(pos), persistent=False)
            self.register_buffer("freqs", timestep_frequencies(c.frequency_dim, c.prediction).view(1, -1), persistent=False)
            # PixArt-alpha's micro-conditions are a constant of the latent size: deploy_model fills this in
            self.register_buffer("micro_condition", torch.zeros(1, d.hidden, 1, 1), persistent=False)
        if c.caption_projection:
            self.caption_proj1 = conv1x1(c.text_dim, d.hidden)
            self.caption_proj2 = conv1x1(d.hidden, d.hidden)
        self.t_mlp1 = conv1x1(c.frequency_dim, d.hidden)
        self.t_mlp2 = conv1x1(d.hidden, d.hidden)
        self.t_block = conv1x1(d.hidden, 6 * d.hidden)
        for stage in ("down", "middle", "up"):
            setattr(self, stage, nn.ModuleList(DeployBlock(c, b, self.layout, query_chunk) for b in plan.blocks if b.stage == stage))
        if c.stage_downsample:
            self.downsample = nn.Conv2d(d.hidden, d.hidden, 2, stride=2)
            self.upsample = nn.ConvTranspose2d(d.hidden, d.hidden, 2, stride=2)
        self.n_skips = plan.n_skips
        self.final_norm = LayerNormANE(d.hidden, affine=False)
        self.final_table = nn.Parameter(torch.zeros(1, 2 * d.hidden, 1, 1))
        self.final = conv1x1(d.hidden, p * p * c.latent_channels)
        # Training only (self-distillation): keep each block's input and recompute its internals in the backward
        # pass, trading one more forward for the activation memory of all blocks but one.
        self.checkpoint_blocks = False

    def fuse_attention(self, fused: bool = True) -> DeployDiT:
        """Attention on batched kernels (deploy/fused_attention.py) for a graph that only runs in torch: the same
        parameters and sums, a few ops per layer instead of a few per head and BNA block. Converted graphs never
        fuse: the ANE layout is the split-einsum one."""
        for module in self.modules():
            if isinstance(module, (DeploySelfAttention, DeployCrossAttention)):
                module.fused = fused
        return self

    def _block(self, blk: DeployBlock, x, t0, text, skip=None, text_bias=None):
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, t0, text, skip, text_bias, use_reentrant=False)
        return blk(x, t0, text, skip, text_bias)

    def _to_layout(self, x):
        return self.layout.to_blocks(x) if self.layout is not None else x

    def _from_layout(self, x):
        return self.layout.from_blocks(x) if self.layout is not None else x

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`text_mask` (B, T), 1 for a token and 0 for padding: the package input of configs with text_mask."""
        bias = text_mask_bias(text_mask)
        bias = None if bias is None else bias[:, None, :, None]  # (B, T) -> (B, 1, T, 1): keys on axis 2 of the score bias
        if bias is not None and bias.dtype != text.dtype:  # an fp16 graph adds it to fp16 scores
            bias = bias.to(text.dtype)
        return self.head(self.run_blocks(self.embed(latent, timestep), self.project_text(text), 0, self.n_blocks, bias))

    # The forward in three parts, so that a chunk (deploy/chunks.py) runs a contiguous range of blocks with the same
    # code: embed -> blocks [start, end) -> head, the state between blocks held in a Carry.
    @property
    def n_blocks(self) -> int:
        return len(self.plan)

    def block_at(self, pos: int) -> tuple[str, int]:
        """Block `pos` of the flat order down, middle, up as (stage, index in stage)."""
        b = self.plan.blocks[pos]
        return b.stage, b.index

    def embed(self, latent: torch.Tensor, timestep: torch.Tensor) -> Carry:
        c = self.config
        if self.pos is None:  # positions added on the raster map: the block layout permutes sums alike
            x = self._to_layout(self.patch_embed(latent) + self.pos_rows + self.pos_cols)  # (B, D, h, w) -> block layout
        else:
            x = self._to_layout(self.patch_embed(latent)) + self.pos
        args = timestep.view(-1, 1) * self.freqs
        tfeat = torch.cat([args.cos(), args.sin()], dim=1).view(-1, c.frequency_dim, 1, 1)
        if tfeat.dtype != x.dtype:  # the timestep island: features in the timestep's fp32, the rest in the compute dtype
            tfeat = tfeat.to(x.dtype)
        temb = self.t_mlp2(F.silu(self.t_mlp1(tfeat)))
        if c.micro_conditions:
            temb = temb + self.micro_condition
        return Carry(x=x, t0=self.t_block(F.silu(temb)), temb=temb)

    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        """PixArt's caption projection, once per call: (B, text_dim, 1, T) -> (B, D, 1, T)."""
        if not self.config.caption_projection:
            return text
        return self.caption_proj2(F.gelu(self.caption_proj1(text), approximate="tanh"))

    def run_blocks(self, carry: Carry, text: torch.Tensor, start: int, end: int, text_bias: torch.Tensor | None = None) -> Carry:
        """Blocks [start, end) of the flat order, reading `text` as project_text returns it; the stage transitions at a position run before its block (and
        those at n_blocks with the last block), so every range ends between two blocks."""
        x, skips = carry.x, list(carry.skips)
        hi_res = carry.hi_res
        for pos in range(start, end + 1 if end == self.n_blocks else end):
            down, up = self.plan.transitions_before(pos)
            if down:
                hi_res = x
                # inside block-column strips (the same result as on the raster grid), or on the raster grid
                x = self.downsample(self.layout.strided_input(x) if self.layout is not None else x)
            if up:
                upsampled = self.upsample(x)
                x, hi_res = (self.layout.strided_output(upsampled) if self.layout is not None else upsampled) + hi_res, None
            if pos == self.n_blocks:
                break
            b = self.plan.blocks[pos]
            x = self._block(getattr(self, b.stage)[b.index], x, carry.t0, text, skips.pop() if b.reads_skip else None, text_bias)
            if b.writes_skip:
                skips.append(x)
        return Carry(x=x, t0=carry.t0, temb=carry.temb, hi_res=hi_res, skips=skips)

    def head(self, carry: Carry) -> torch.Tensor:
        c = self.config
        temb = carry.temb
        hidden = temb.shape[1]
        shift, scale = self.final_table[:, :hidden] + temb, self.final_table[:, hidden:] + temb
        x = self.final(self.final_norm(carry.x) * (1 + scale) + shift)
        x = self._from_layout(x)
        p = c.patch_size
        return F.pixel_shuffle(x, p) if p > 1 else x

"""The deploy graph's attention computed with batched kernels, for the graphs edgecompile only runs in torch:
the teacher and student of the sweep, the layer statistics and self-distillation, and verification's simulation.

The ANE layout (deploy/dit.py) unrolls attention per head and per BNA block so that the converted program is made
of einsums on channel splits; in torch that costs tens of thousands of tiny ops per training step (issue 29: a
distillation step of the bundled model ran 52-80k aten ops and was bound by per-op overhead). These functions
take and return the very tensors the split-einsum ones do, (B, C, 1, S) in deploy block order, and compute the
same sums with one `scaled_dot_product_attention` per layer; only the order of floating-point additions differs
(tests/test_deploy.py holds the two within float32 rounding). They are never traced for conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_attention(q, k_t, v, heads: int, kv_heads: int, head_dim: int, q_scaled: bool = False,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """`split_einsum_attention` in one kernel: q (B, Hq*d, 1, Sq), k_t (B, Sk, 1, Hkv*d), v (B, Hkv*d, 1, Sk),
    bias (B or 1, Hq or 1, Sk, Sq or 1) -> (B, Hq*d, 1, Sq)."""
    if not q_scaled:
        q = q * head_dim**-0.5  # the same rounding as the split-einsum graph: q is scaled before the product
    b, _, _, sq = q.shape
    sk = k_t.shape[1]
    qh = q.reshape(b, heads, head_dim, sq).transpose(2, 3)  # (B, Hq, Sq, d)
    kh = k_t.reshape(b, sk, kv_heads, head_dim).transpose(1, 2)  # (B, Hkv, Sk, d)
    vh = v.reshape(b, kv_heads, head_dim, sk).transpose(2, 3)  # (B, Hkv, Sk, d)
    mask = None if bias is None else bias.transpose(2, 3)  # (B or 1, Hq or 1, Sq or 1, Sk)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=1.0, enable_gqa=heads != kv_heads)  # (B, Hq, Sq, d)
    return out.transpose(2, 3).reshape(b, heads * head_dim, 1, sq)


def neighbour_table(neighbour_blocks: list[tuple[int, list[int]]], block_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockLayout.neighbour_blocks as (index (n_blocks, K) of neighbour blocks, padded with the block itself;
    key mask (n_blocks, K * block_len), False on padding), rows in deploy block order."""
    n_blocks = len(neighbour_blocks)
    k = max(len(n) for _, n in neighbour_blocks)
    index = torch.zeros(n_blocks, k, dtype=torch.long)
    valid = torch.zeros(n_blocks, k, dtype=torch.bool)
    for block, neighbours in neighbour_blocks:
        index[block] = block
        index[block, : len(neighbours)] = torch.tensor(neighbours)
        valid[block, : len(neighbours)] = True
    return index, valid.repeat_interleave(block_len, dim=1)


def fused_bna(q_seq, k_seq_t, v_seq, heads: int, kv_heads: int, head_dim: int, index: torch.Tensor,
              key_mask: torch.Tensor) -> torch.Tensor:
    """`DeploySelfAttention.bna` in one kernel: every query block against its gathered neighbourhood.
    q_seq (B, Hq*d, 1, S) already scaled, k_seq_t (B, S, 1, Hkv*d), v_seq (B, Hkv*d, 1, S), blocks contiguous
    runs of S (block-column layout); index/key_mask from `neighbour_table`. Returns (B, Hq*d, 1, S)."""
    b, _, _, s = q_seq.shape
    n_blocks, k = index.shape
    nb = s // n_blocks
    qb = q_seq.reshape(b, heads, head_dim, n_blocks, nb).permute(0, 3, 1, 4, 2)  # (B, n_blocks, Hq, nb, d)
    kb = k_seq_t.reshape(b, n_blocks, nb, kv_heads, head_dim)  # (B, n_blocks, nb, Hkv, d)
    vb = v_seq.reshape(b, kv_heads, head_dim, n_blocks, nb).permute(0, 3, 4, 1, 2)  # (B, n_blocks, nb, Hkv, d)
    idx = index.to(q_seq.device)

    def gather(x):  # (B, n_blocks, nb, Hkv, d) -> (B * n_blocks, Hkv, K * nb, d): each block's neighbourhood
        return x[:, idx].reshape(b * n_blocks, k * nb, kv_heads, head_dim).transpose(1, 2)

    mask = key_mask.to(q_seq.device)[None].expand(b, -1, -1).reshape(b * n_blocks, 1, 1, k * nb)  # padding blocks masked out
    out = F.scaled_dot_product_attention(qb.reshape(b * n_blocks, heads, nb, head_dim), gather(kb), gather(vb), attn_mask=mask,
                                         scale=1.0, enable_gqa=heads != kv_heads)  # (B * n_blocks, Hq, nb, d)
    return out.reshape(b, n_blocks, heads, nb, head_dim).permute(0, 2, 4, 1, 3).reshape(b, heads * head_dim, 1, s)

"""Text encoders in the Neural Engine layout: transformers' `T5EncoderModel` (PixArt-α/Σ) and `CLIPTextModel` /
`CLIPTextModelWithProjection` (TinyCLIP, SD) rewritten on ml-ane-transformers' principles, with the very weights
of the transformers module (the reference their outputs must equal).

    input_ids       (1, T) int32 token ids, padded to T as the pipeline pads them
    attention_mask  (1, T) int32, 1 for a token, 0 for padding (T5; CLIP attends causally and needs none)
    ->
    token_level_text_embeddings  (1, D, 1, T) float32: the denoiser's text input, bound by name
    pooled_text_embeddings       (1, P) float32 (CLIPTextModelWithProjection only)

Each principle is named where it applies: (B, C, 1, S) activations with channels on axis 1, 1x1 convs for every
linear, norms over the channel axis, split-einsum attention per head.

fp16: T5's RMS norm squares activations, which overflow fp16 once they pass 256; each RMS norm divides its input
by a power of two first (`rms_scale`, exact in floating point), set from calibration prompts by `calibrate_scales`,
so the squares stay finite without an fp32 island. Other overflowing ops become fp32 islands at conversion
(coreml/component.py finds them in the fp16 emulation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgecompile.deploy.contract import TEXT
from edgecompile.deploy.dit import conv1x1, split_einsum_attention
from edgecompile.errors import EdgeCompileError

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POOLED = "pooled_text_embeddings"
MASK_VALUE = -1e4  # added to the scores of padding keys: exp(-1e4) is 0 in fp16 and fp32, and -1e4 is finite in fp16


def conv_from_linear(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 conv holding a linear layer's weights (Principle: linear layers as 1x1 convs on (B, C, 1, S))."""
    conv = conv1x1(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


class RMSNormANE(nn.Module):
    """T5's RMS norm over the channel axis; the input is divided by `rms_scale` (a power of two) before squaring,
    which changes no value but keeps the squares finite in fp16."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps = eps
        self.rms_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.rms_scale
        xs = x * (1.0 / s) if s != 1.0 else x  # (B, C, 1, S): exact, a power of two
        # Principle: reduce over the channel axis (axis 1) of (B, C, 1, S); no transpose to (B, S, C)
        variance = (xs * xs).mean(dim=1, keepdim=True)  # (B, 1, 1, S)
        out = xs * torch.rsqrt(variance + self.eps / (s * s))  # x / rms(x): the scale cancels
        return out * self.weight.view(1, -1, 1, 1)


def relative_position_bias(embedding: nn.Embedding, length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional relative position bias for `length` tokens, (1, H, Sk, Sq) in score layout: a constant of
    the static text length, computed here as transformers computes it."""
    context = torch.arange(length)[:, None]
    memory = torch.arange(length)[None, :]
    relative = memory - context  # (Sq, Sk)
    buckets = num_buckets // 2
    out = (relative > 0).long() * buckets
    n = relative.abs()
    exact = buckets // 2
    large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    large = torch.minimum(large, torch.full_like(large, buckets - 1))
    out = out + torch.where(n < exact, n, large)
    with torch.no_grad():
        bias = embedding(out)  # (Sq, Sk, H)
    return bias.permute(2, 1, 0)[None].contiguous()  # (1, H, Sk, Sq)


class T5BlockANE(nn.Module):
    def __init__(self, block, config):
        super().__init__()
        attn_layer, ff_layer = block.layer[0], block.layer[1]
        a = attn_layer.SelfAttention
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.norm1 = RMSNormANE(attn_layer.layer_norm.weight, attn_layer.layer_norm.variance_epsilon)
        self.q, self.k, self.v, self.o = (conv_from_linear(m) for m in (a.q, a.k, a.v, a.o))
        self.norm2 = RMSNormANE(ff_layer.layer_norm.weight, ff_layer.layer_norm.variance_epsilon)
        ff = ff_layer.DenseReluDense
        self.gated = hasattr(ff, "wi_0")
        if self.gated:
            self.wi_0, self.wi_1 = conv_from_linear(ff.wi_0), conv_from_linear(ff.wi_1)
        else:
            self.wi = conv_from_linear(ff.wi)
        self.wo = conv_from_linear(ff.wo)
        self.act = config.dense_act_fn

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.act in ("gelu_new", "gelu_pytorch_tanh"):
            return F.gelu(x, approximate="tanh")
        if self.act == "gelu":
            return F.gelu(x)
        if self.act == "relu":
            return F.relu(x)
        raise EdgeCompileError(f"T5 dense_act_fn {self.act!r} is not supported (edgecompile takes relu, gelu, gelu_new)")

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)  # (B, D, 1, S)
        k_t = self.k(h).permute(0, 3, 2, 1)  # (B, S, 1, H*d): the one key transpose
        # T5 does not scale scores by 1/sqrt(d) (its initialisation folds it into q)
        attn = split_einsum_attention(self.q(h), k_t, self.v(h), self.heads, self.heads, self.head_dim, q_scaled=True, bias=bias)
        x = x + self.o(attn)  # (B, D, 1, S)
        h = self.norm2(x)
        inner = self.activation(self.wi_0(h)) * self.wi_1(h) if self.gated else self.activation(self.wi(h))
        return x + self.wo(inner)


class T5EncoderANE(nn.Module):
    """transformers' T5EncoderModel for `text_len` tokens: (input_ids, attention_mask) -> (1, D, 1, T)."""

    def __init__(self, model, text_len: int):
        super().__init__()
        config = model.config
        self.text_len = text_len
        self.embed = nn.Embedding.from_pretrained(model.get_input_embeddings().weight.detach().clone(), freeze=True)
        stack = model.encoder
        first = stack.block[0].layer[0].SelfAttention
        if not first.has_relative_attention_bias:
            raise EdgeCompileError("this T5 encoder's first block has no relative attention bias: not a T5 encoder edgecompile reads")
        self.register_buffer("position_bias", relative_position_bias(first.relative_attention_bias, text_len,
                                                                     config.relative_attention_num_buckets,
                                                                     config.relative_attention_max_distance))
        self.blocks = nn.ModuleList(T5BlockANE(b, config) for b in stack.block)
        self.final_norm = RMSNormANE(stack.final_layer_norm.weight, stack.final_layer_norm.variance_epsilon)

    input_names = (INPUT_IDS, ATTENTION_MASK)
    output_names = (TEXT,)

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(1, self.text_len, dtype=torch.int32)
        return ids, torch.ones(1, self.text_len, dtype=torch.int32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids.long()).transpose(1, 2)[:, :, None]  # (B, T, D) -> (B, D, 1, T)
        # padding keys get MASK_VALUE: (B, 1, Sk, 1) broadcast over heads and queries
        pad = (1.0 - attention_mask.to(self.position_bias.dtype))[:, None, :, None] * MASK_VALUE  # in the compute dtype
        bias = self.position_bias + pad  # (B, H, Sk, Sq)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.final_norm(x)  # (B, D, 1, T)

    def norms(self) -> list[RMSNormANE]:
        return [m for m in self.modules() if isinstance(m, RMSNormANE)]


class CLIPLayerANE(nn.Module):
    def __init__(self, layer, config):
        super().__init__()
        a = layer.self_attn
        self.heads, self.head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.norm1 = layernorm_ane(layer.layer_norm1)
        self.q, self.k, self.v, self.out = (conv_from_linear(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.out_proj))
        # 1/sqrt(d) folded into q's weights here: left as a multiply after the conv, the converter folds it into the
        # weight const itself, under a new name that the palette config (coreml/palettize.py) would not find
        with torch.no_grad():
            self.q.weight.mul_(self.head_dim**-0.5)
            self.q.bias.mul_(self.head_dim**-0.5)
        self.norm2 = layernorm_ane(layer.layer_norm2)
        self.fc1, self.fc2 = conv_from_linear(layer.mlp.fc1), conv_from_linear(layer.mlp.fc2)
        self.act = config.hidden_act

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "quick_gelu":
            return x * torch.sigmoid(1.702 * x)
        if self.act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            return F.gelu(x, approximate="none" if self.act == "gelu" else "tanh")
        raise EdgeCompileError(f"CLIP hidden_act {self.act!r} is not supported (edgecompile takes quick_gelu and gelu)")

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        k_t = self.k(h).permute(0, 3, 2, 1)  # (B, S, 1, H*d)
        x = x + self.out(split_einsum_attention(self.q(h), k_t, self.v(h), self.heads, self.heads, self.head_dim, q_scaled=True, bias=bias))
        return x + self.fc2(self.activation(self.fc1(self.norm2(x))))


def layernorm_ane(norm: nn.LayerNorm):
    from edgecompile.deploy.dit import LayerNormANE

    out = LayerNormANE(norm.normalized_shape[0], affine=True, eps=norm.eps)
    with torch.no_grad():
        out.weight.copy_(norm.weight)
        out.bias.copy_(norm.bias)
    return out


class CLIPTextANE(nn.Module):
    """transformers' CLIPTextModel / CLIPTextModelWithProjection for `text_len` tokens, causal attention:
    input_ids -> (1, D, 1, T) [and the projected pooled embedding]."""

    def __init__(self, model, text_len: int):
        super().__init__()
        config = model.config
        tm = getattr(model, "text_model", model)  # transformers 5: CLIPTextModel is the text transformer itself
        if text_len > config.max_position_embeddings:
            raise EdgeCompileError(f"--text-len {text_len} is longer than this CLIP's {config.max_position_embeddings} positions")
        self.text_len, self.eos_token_id = text_len, config.eos_token_id
        emb = tm.embeddings
        self.token = nn.Embedding.from_pretrained(emb.token_embedding.weight.detach().clone(), freeze=True)
        self.register_buffer("positions", emb.position_embedding.weight[:text_len].detach().clone().T[None, :, None, :])  # (1, D, 1, T)
        causal = torch.full((text_len, text_len), MASK_VALUE).triu(1)  # (Sq, Sk): a query sees itself and earlier keys
        self.register_buffer("causal", causal.T[None, None].contiguous())  # (1, 1, Sk, Sq)
        self.layers = nn.ModuleList(CLIPLayerANE(layer, config) for layer in tm.encoder.layers)
        self.final_norm = layernorm_ane(tm.final_layer_norm)
        proj = getattr(model, "text_projection", None)
        self.projection = conv_from_linear(proj) if proj is not None else None

    input_names = (INPUT_IDS,)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (TEXT, POOLED) if self.projection is not None else (TEXT,)

    def example(self) -> tuple[torch.Tensor]:
        return (torch.zeros(1, self.text_len, dtype=torch.int32),)

    def forward(self, input_ids: torch.Tensor):
        x = self.token(input_ids.long()).transpose(1, 2)[:, :, None] + self.positions  # (B, D, 1, T)
        for layer in self.layers:
            x = layer(x, self.causal)
        x = self.final_norm(x)  # (B, D, 1, T)
        if self.projection is None:
            return x
        # the pooled token: the first end-of-text token (the highest id when eos_token_id is 2, as transformers reads
        # the original CLIP vocabularies), as a one-hot weight over positions rather than a dynamic gather
        ids = input_ids.long()
        hit = ids.argmax(dim=-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(dim=-1)  # (B,)
        onehot = F.one_hot(hit, self.text_len).to(x.dtype)[:, None, None, :]  # (B, 1, 1, T)
        pooled = (x * onehot).sum(dim=3, keepdim=True)  # (B, D, 1, 1)
        return x, self.projection(pooled)[:, :, 0, 0]  # (B, P)


def text_encoder_graph(model, text_len: int) -> nn.Module:
    """The ANE-layout graph of a transformers text encoder, by its class."""
    name = type(model).__name__
    if name == "T5EncoderModel":
        return T5EncoderANE(model, text_len).eval()
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return CLIPTextANE(model, text_len).eval()
    raise EdgeCompileError(f"text encoder class {name} is not supported: edgecompile compiles T5EncoderModel, CLIPTextModel "
                           "and CLIPTextModelWithProjection")


@torch.no_grad()
def calibrate_scales(graph: nn.Module, prompts: list[tuple[torch.Tensor, ...]], headroom: float = 64.0) -> dict[str, float]:
    """Each RMS norm's power-of-two input scale from calibration prompts: the smallest 2^k with max|x| / 2^k
    below `headroom` (whose square, 4096, is far from fp16's 65504). Returns {norm: scale}."""
    peaks: dict[str, float] = {}
    hooks = []
    for name, m in graph.named_modules():
        if isinstance(m, RMSNormANE):
            m.rms_scale = 1.0
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: peaks.__setitem__(
                name, max(peaks.get(name, 0.0), float(inp[0].abs().max())))))
    try:
        for args in prompts:
            graph(*args)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for name, m in graph.named_modules():
        if isinstance(m, RMSNormANE):
            peak = peaks.get(name, 0.0)
            m.rms_scale = float(2 ** max(0, math.ceil(math.log2(peak / headroom)))) if peak > headroom else 1.0
            scales[name] = m.rms_scale
    return scales


# ---- chunks: a text encoder whose weights pass the Neural Engine's 2 GiB file limit (T5-XXL: 4.7B parameters) ----
HIDDEN = "text_encoder_hidden_states"  # what crosses from one text-encoder chunk to the next, (1, D, 1, T)
CHUNK_WEIGHT_BYTES = 1.5 * 2**30  # the weights one chunk may hold: margin under the 2 GiB limit for LUTs and biases


class T5EncoderChunk(nn.Module):
    """Blocks [start, end) of a T5EncoderANE as a package of its own: the first chunk embeds the ids, the last applies
    the final norm, and each rebuilds the attention bias from the mask (its own copy of the (1, H, T, T) position
    bias, one add), so only the hidden states and the mask cross packages. Module names are the whole graph's
    (`blocks.<i>`), so the whole graph's palettes and RMS-norm scales apply as they are."""

    def __init__(self, encoder: T5EncoderANE, start: int, end: int):
        super().__init__()
        self.index_range = (start, end)
        self.first, self.last = start == 0, end == len(encoder.blocks)
        self.embed = encoder.embed if self.first else None
        self.register_buffer("position_bias", encoder.position_bias)
        self.blocks = nn.ModuleDict({str(i): encoder.blocks[i] for i in range(start, end)})
        self.final_norm = encoder.final_norm if self.last else None
        self.input_names = (INPUT_IDS if self.first else HIDDEN, ATTENTION_MASK)
        self.output_names = (TEXT if self.last else HIDDEN,)

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.ones(1, self.position_bias.shape[-1], dtype=torch.int32)
        if self.first:
            return torch.zeros_like(mask), mask
        return torch.zeros(1, next(iter(self.blocks.values())).q.in_channels, 1, mask.shape[1]), mask

    def owns(self, layer: str) -> bool:
        head = layer.split(".")[0]
        return (head == "blocks" and layer.split(".")[1] in self.blocks) or (head == "embed" and self.first) or \
            (head == "final_norm" and self.last)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed(x.long()).transpose(1, 2)[:, :, None]  # (B, T) ids -> (B, D, 1, T)
        bias = self.position_bias + (1.0 - attention_mask.to(self.position_bias.dtype))[:, None, :, None] * MASK_VALUE  # (B, H, Sk, Sq)
        for blk in self.blocks.values():
            x = blk(x, bias)
        return self.final_norm(x) if self.last else x  # (B, D, 1, T)


def text_encoder_chunk_count(graph: nn.Module, bits: int) -> int:
    """How many chunks keep every weight file of this encoder under CHUNK_WEIGHT_BYTES at `bits` per weight."""
    weight_bytes = sum(p.numel() for p in graph.parameters()) * bits / 8
    return max(1, math.ceil(weight_bytes / CHUNK_WEIGHT_BYTES))


def split_text_encoder(graph: nn.Module, n: int) -> list[T5EncoderChunk]:
    """N chunks of a T5 encoder graph at block boundaries, blocks shared evenly (T5's blocks are equal in size)."""
    if not isinstance(graph, T5EncoderANE):
        raise EdgeCompileError(f"text-encoder chunks are for T5 encoders (T5-XXL passes the 2 GiB weight-file limit); this "
                               f"{type(graph).__name__} fits one package: drop --text-encoder-chunks")
    blocks = len(graph.blocks)
    if not 1 <= n <= blocks:
        raise EdgeCompileError(f"--text-encoder-chunks {n}: this T5 encoder has {blocks} blocks: give 1..{blocks}")
    bounds = [round(k * blocks / n) for k in range(n + 1)]
    return [T5EncoderChunk(graph, a, b).eval() for a, b in zip(bounds, bounds[1:])]

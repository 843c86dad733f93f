"""Static analysis of a deploy graph: MACs per denoising step by op class, op count, largest intermediate.

The deploy model runs once on the meta device (shapes only, no memory, no arithmetic) under a TorchFunctionMode
that sees every convolution, einsum and elementwise call, so the counts come from the same code that is exported,
at any scale (a 1.6B model at 1024x1024 is analysed in seconds). Attention einsums are classed by their shapes:
keys of text length -> cross; queries of one BNA block -> BNA (local); the rest -> global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from edgecompile.deploy.dit import DeployDiT
from edgecompile.model.config import ModelConfig
from edgecompile.model.elastic import width_config

OP_CLASSES = ("conv1x1", "conv_other", "attn_bna", "attn_global", "attn_cross", "other")
LAYOUT_FUNCS = {"reshape", "view", "transpose", "permute", "flatten"}
VIEW_FUNCS = {"__getitem__", "chunk", "split", "contiguous", "expand", "expand_as", "detach"}
ACT_BYTES = 2  # fp16 activations on device


@dataclass
class GraphStats:
    macs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OP_CLASSES, 0))
    ops: int = 0  # compute calls (convs, einsums, elementwise, concat): a proxy for the package's op count
    layout_ops: int = 0  # reshape / transpose
    largest_tensor_bytes: int = 0
    activation_bytes: int = 0  # bytes written by all compute calls (fp16)
    params: int = 0
    # per compute op: (class, MACs, weight elements, activation elements read + written)
    records: list[tuple[str, int, int, int]] = field(default_factory=list, repr=False)

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    def to_dict(self) -> dict:
        return {"macs": dict(self.macs), "total_macs": self.total_macs, "ops": self.ops, "layout_ops": self.layout_ops,
                "largest_tensor_bytes": self.largest_tensor_bytes, "activation_bytes": self.activation_bytes, "params": self.params}


class _Recorder(TorchFunctionMode):
    def __init__(self, stats: GraphStats, text_len: int, block_len: int | None):
        super().__init__()
        self.stats, self.text_len, self.block_len = stats, text_len, block_len

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if not isinstance(out, torch.Tensor) or name in VIEW_FUNCS:
            return out
        s = self.stats
        if name in LAYOUT_FUNCS:
            s.layout_ops += 1
            return out
        s.ops += 1
        nbytes = out.numel() * ACT_BYTES
        s.activation_bytes += nbytes
        s.largest_tensor_bytes = max(s.largest_tensor_bytes, nbytes)
        before = dict(s.macs)
        weight_elems = 0
        if name in ("conv2d", "conv_transpose2d"):
            weight = args[1]
            weight_elems = weight.numel()
            per_out = weight[0].numel() if name == "conv2d" else weight.shape[0] // (kwargs or {}).get("groups", 1) * weight.shape[2] * weight.shape[3]
            if name == "conv_transpose2d":  # every input element meets every kernel tap: MACs = in x Cout x k x k
                s.macs["conv_other"] += args[0].numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
            else:
                s.macs["conv1x1" if weight.shape[2:] == (1, 1) else "conv_other"] += out.numel() * per_out
        elif name == "einsum":
            eq, a, b = args[0], args[1], args[2]
            if eq == "bchq,bkhc->bkhq":  # scores: q (B, C, 1, Q), k (B, K, 1, C)
                q_len, k_len, macs = a.shape[3], b.shape[1], out.numel() * a.shape[1]
            else:  # "bkhq,bchk->bchq": weights (B, K, 1, Q), v (B, C, 1, K)
                q_len, k_len, macs = a.shape[3], a.shape[1], out.numel() * a.shape[1]
            kind = "attn_cross" if k_len == self.text_len else "attn_bna" if q_len == self.block_len else "attn_global"
            s.macs[kind] += macs
        else:
            s.macs["other"] += out.numel()
        cls = next(c for c in OP_CLASSES if s.macs[c] != before[c]) if s.macs != before else "other"
        act = out.numel() + sum(a.numel() for a in args if isinstance(a, torch.Tensor)) - weight_elems
        s.records.append((cls, s.macs[cls] - before[cls], weight_elems, act))
        return out


def deploy_graph_stats(config: ModelConfig, width: float = 1.0, latent_hw: tuple[int, int] | None = None) -> GraphStats:
    """Analyse the deploy graph of `width` of `config` at `latent_hw` (default: the config's sample size)."""
    dense = width_config(config, width) if config.widths != (1.0,) else config
    latent_hw = tuple(latent_hw or config.sample_size)
    with torch.device("meta"):
        model = DeployDiT(dense, latent_hw)
    block_len = model.layout.block_len if model.layout is not None else None
    model = model.to("meta")
    stats = GraphStats(params=sum(p.numel() for p in model.parameters()))
    latent = torch.empty((1, dense.latent_channels, *latent_hw), device="meta")
    t = torch.empty((1,), device="meta")
    text = torch.empty((1, dense.text_dim, 1, dense.text_len), device="meta")
    with torch.no_grad(), _Recorder(stats, dense.text_len, block_len):
        model(latent, t, text)
    return stats


def _shape(var) -> tuple[int, ...] | None:
    shape = getattr(var, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None and all(isinstance(d, (int, np.integer)) for d in shape) else None


def program_stats(view) -> GraphStats:
    """The same analysis read off a package's own MIL program (static shapes), for packages with no edgecompile
    deploy graph to rebuild: the pipeline's text encoder and decoder. MACs of convs, linears, matmuls and einsums from
    their operand shapes; every other compute op counts its output elements."""
    stats = GraphStats()
    weights = {}
    for o in view.main.operations:
        if o.op_type == "const" or o.op_type.startswith("constexpr"):
            out = o.outputs[0]
            shape = _shape(out)
            if shape is not None and len(shape) >= 2:
                weights[out.name] = int(np.prod(shape))
    stats.params = sum(weights.values())
    for o in view.main.operations:
        if o.op_type == "const" or o.op_type.startswith("constexpr"):
            continue
        out_shape = _shape(o.outputs[0]) if o.outputs else None
        if out_shape is None:
            continue
        numel = int(np.prod(out_shape)) if out_shape else 1
        if o.op_type in ("reshape", "transpose"):
            stats.layout_ops += 1
            continue
        stats.ops += 1
        nbytes = numel * ACT_BYTES
        stats.activation_bytes += nbytes
        stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, nbytes)
        weight_elems, cls, macs = 0, "other", numel
        if o.op_type in ("conv", "conv_transpose", "linear"):
            w = o.inputs["weight"]
            wshape = _shape(w) or ()
            weight_elems = weights.get(w.name, int(np.prod(wshape)) if wshape else 0)
            if o.op_type == "linear":
                cls, macs = "conv1x1", numel * wshape[1]
            elif o.op_type == "conv":
                groups = int(o.inputs["groups"].val) if "groups" in o.inputs else 1
                cls = "conv1x1" if wshape[2:] == (1, 1) and groups == 1 else "conv_other"
                macs = numel * int(np.prod(wshape[1:]))
            else:
                x = _shape(o.inputs["x"]) or (1,)
                cls, macs = "conv_other", int(np.prod(x)) * int(np.prod(wshape[1:]))
        elif o.op_type == "einsum":
            shapes = [_shape(v) for v in o.inputs["values"]]
            if all(shapes):  # every index of the equation, once: the MACs of a two-operand contraction
                sizes = {}
                for term, shape in zip(o.inputs["equation"].val.split("->")[0].split(","), shapes):
                    sizes.update(zip(term, shape))
                cls, macs = "attn_global", int(np.prod(list(sizes.values())))
        elif o.op_type == "matmul":
            x = _shape(o.inputs["x"])
            if x:
                transposed = "transpose_x" in o.inputs and bool(o.inputs["transpose_x"].val)
                cls, macs = "attn_global", numel * x[-2 if transposed else -1]
        stats.macs[cls] += macs
        stats.records.append((cls, macs, weight_elems, numel))
    return stats

"""Elastic widths (§3.2): a width of the supernetwork as a standalone dense model, and its size."""

from __future__ import annotations

import torch

from torch import nn

from edgecompile.model.config import ModelConfig, width_key
from edgecompile.model.dit import EfficientDiT, ElasticLinear

DENSE_KEY = width_key(1.0)  # a dense (extracted) model keeps its per-width parameters under width 1.0
WIDTH_SUFFIX = "@"  # an extracted width's config is named NAME@WIDTH


def width_config(config: ModelConfig, width: float) -> ModelConfig:
    """The config of width `width` as a dense model of its own (its only width is 1.0)."""
    d = config.dims(width)
    return config.replace(
        name=f"{config.name}{WIDTH_SUFFIX}{width:g}", hidden_dim=d.hidden, num_heads=d.heads, num_kv_heads=d.kv_heads, widths=(1.0,)
    )


@torch.no_grad()
def extract_width(model: EfficientDiT, width: float, share: bool = False) -> EfficientDiT:
    """Slice width `width` out of the supernetwork; the result equals `model(..., width=width)`.

    share=True returns views of the supernetwork's storage where slicing allows (no copy of a 1.6B model
    for read-only uses such as export); otherwise the dense model owns its weights.
    """
    model.check_width(width)
    with torch.device("meta"):
        dense = EfficientDiT(width_config(model.config, width))
    source = dict(model.named_modules())
    state = {}
    for name, mod in dense.named_modules():
        src = source[name]
        prefix = f"{name}." if name else ""
        if isinstance(mod, ElasticLinear):
            w, b = src.sliced(mod.weight.shape[1], mod.weight.shape[0])
            state[prefix + "weight"] = w
            if b is not None:
                state[prefix + "bias"] = b
        elif isinstance(mod, torch.nn.ParameterDict):
            state[prefix + DENSE_KEY] = src[width_key(width)]
        else:
            for pname, p in mod.named_parameters(recurse=False):  # convolutions: leading channels
                state[prefix + pname] = getattr(src, pname)[tuple(slice(0, n) for n in p.shape)]
    if not share:
        state = {k: v.detach().clone() for k, v in state.items()}
    dense.load_state_dict(state, assign=True)
    return dense.eval()


@torch.no_grad()
def narrow_to_width(model: EfficientDiT, width: float, dtype: torch.dtype | None = None) -> EfficientDiT:
    """Keep, in place, only what widths up to `width` read: each elastic parameter cut to its slice at `width`
    (copied, so the supernetwork's storage is freed), the per-width parameters of larger widths dropped; `dtype`
    converts what is kept. The model still runs every width up to `width` bit for bit and refuses larger ones.

    Why: an export or verification of the paper's width 0.5 reads 0.44B of the 1.46B supernetwork; holding the rest
    in fp32 cost 4.1 GiB of the sweep's peak and converting it from fp16 8 s of every `verify`."""
    model.check_width(width)
    cast = (lambda t: t.to(dtype).contiguous()) if dtype is not None else (lambda t: t.clone(memory_format=torch.contiguous_format))
    with torch.device("meta"):
        dense = EfficientDiT(width_config(model.config, width))
    source = dict(model.named_modules())
    keep = {width_key(w) for w in model.config.widths if w <= width}
    for name, mod in dense.named_modules():
        src = source[name]
        if isinstance(mod, ElasticLinear):
            w, b = src.sliced(mod.weight.shape[1], mod.weight.shape[0])  # (out, in) at `width`: grouped rows kept per group
            src.weight = nn.Parameter(cast(w), requires_grad=src.weight.requires_grad)
            if b is not None:
                src.bias = nn.Parameter(cast(b), requires_grad=src.bias.requires_grad)
        elif isinstance(src, nn.ParameterDict):
            for key in list(src.keys()):
                if key in keep:
                    src[key] = nn.Parameter(cast(src[key]), requires_grad=src[key].requires_grad)
                else:
                    del src[key]
        else:
            for pname, p in mod.named_parameters(recurse=False):  # convolutions: leading channels
                old = getattr(src, pname)
                setattr(src, pname, nn.Parameter(cast(old[tuple(slice(0, n) for n in p.shape)]), requires_grad=old.requires_grad))
    model.narrowed_to = width
    return model


def count_params(config: ModelConfig, width: float) -> int:
    """Parameters of width `width` as a standalone model (built on the meta device: no memory)."""
    with torch.device("meta"):
        dense = EfficientDiT(width_config(config, width))
    return sum(p.numel() for p in dense.parameters())

"""Elastic widths (§3.2): a width of the supernetwork as a standalone dense model, and its size."""

from __future__ import annotations

import torch

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


def count_params(config: ModelConfig, width: float) -> int:
    """Parameters of width `width` as a standalone model (built on the meta device: no memory)."""
    with torch.device("meta"):
        dense = EfficientDiT(width_config(config, width))
    return sum(p.numel() for p in dense.parameters())

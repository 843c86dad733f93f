"""Reference (training layout) -> deploy (ANE layout) weights. Module names are shared by both models, so
the map is generic: a linear (out, in) becomes a 1x1 conv (out, in, 1, 1); a per-width parameter is read
from the width being deployed; the final projection's rows are reordered for pixel_shuffle."""

from __future__ import annotations

import torch

from edgecompile.deploy.dit import DeployDiT
from edgecompile.model.config import width_key
from edgecompile.model.dit import EfficientDiT
from edgecompile.model.elastic import extract_width


def reference_tensor(ref_state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    for key in (name, f"{name}.{width_key(1.0)}"):  # shared weights, then per-width parameters
        if key in ref_state:
            return ref_state[key]
    raise KeyError(f"no reference tensor for deploy parameter {name}")


@torch.no_grad()
def deploy_model(model: EfficientDiT, width: float = 1.0, latent_hw: tuple[int, int] | None = None,
                 query_chunk: int | None = None) -> DeployDiT:
    """The deploy graph of `width` of `model` (a supernetwork or an already extracted dense model)."""
    dense = model if model.config.widths == (1.0,) else extract_width(model, width, share=True)
    config = dense.config
    latent_hw = tuple(latent_hw or config.sample_size)
    with torch.device("meta"):  # parameters are assigned below, as views of the reference where possible
        deploy = DeployDiT(config, latent_hw, query_chunk=query_chunk)
    ref_state = dense.state_dict()
    p, ch = config.patch_size, config.latent_channels
    state = {}
    for name, param in deploy.named_parameters():
        src = reference_tensor(ref_state, name)
        if name.startswith("final.") and p > 1:
            # reference rows are ordered (i, j, c); pixel_shuffle wants (c, i, j)
            src = src.view(p, p, ch, *src.shape[1:]).permute(2, 0, 1, *range(3, src.ndim + 2)).reshape(src.shape)
        state[name] = src.reshape(param.shape)
    deploy.load_state_dict(state, assign=True)
    if config.micro_conditions:  # a constant of the latent size, computed once by the reference model
        deploy.micro_condition = dense.micro_condition(*latent_hw).detach().reshape(1, -1, 1, 1).float().cpu()
    return deploy.eval()

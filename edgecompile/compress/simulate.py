"""edgecompile's torch simulation of a compressed package: the deploy model of the package's width with the
palettized weights decoded, rebuilt deterministically from the checkpoint and the bits recorded in the package."""

from __future__ import annotations

import json


def simulated_model_for_package(view, ckpt):
    """None for an fp16 package (its reference is the checkpoint itself); else a callable (latent, t, text_btd)."""
    from edgecompile.compress.palettize_model import palettize_deploy
    from edgecompile.deploy.convert import deploy_model

    meta = view.metadata
    if meta.get("edgecompile.bits", "16") == "16":
        return None
    bits = {k: int(v) for k, v in json.loads(meta["edgecompile.bits_per_layer"]).items()}
    group = int(meta.get("edgecompile.group_size", "0")) or None
    deploy = deploy_model(ckpt.model, view.width, latent_hw=view.latent_hw)
    palettize_deploy(deploy, bits, group)
    return lambda latent, t, text_btd: deploy(latent, t, text_btd.transpose(1, 2)[:, :, None])

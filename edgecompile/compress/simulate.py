"""edgecompile's torch simulation of a compressed package: the deploy model of the package's width with the
palettized weights decoded (and the self-distilled parameters loaded), rebuilt deterministically from the
checkpoint, the bits recorded in the package and the distilled state saved beside it."""

from __future__ import annotations

import json

from edgecompile.errors import EdgeCompileError


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
    want = meta.get("edgecompile.distilled_sha256")
    if want:
        from safetensors.torch import load_file

        from edgecompile.compress.distill import load_trained_state
        from edgecompile.coreml.convert import sha256_file
        from edgecompile.export import DISTILLED_STATE

        state_path = view.path.parent / DISTILLED_STATE
        if not state_path.is_file() or sha256_file(state_path) != want:
            raise EdgeCompileError(f"package {view.path} was self-distilled: keep {DISTILLED_STATE} from its export folder beside it to verify it")
        load_trained_state(deploy, load_file(str(state_path)))
    return lambda latent, t, text_btd: deploy(latent, t, text_btd.transpose(1, 2)[:, :, None])

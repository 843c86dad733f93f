"""PixArt-alpha / PixArt-Sigma (diffusers' `PixArtTransformer2DModel`) as the reference model.

PixArt is a plain DiT: one stack of blocks at full token resolution with global self-attention, adaLN-single,
cross-attention to T5 tokens without a norm before it, a caption projection MLP, diffusers' 2-D sin-cos position
table (`base_size`, `interpolation_scale`), epsilon prediction on the DDPM schedule, and in PixArt-alpha's
1024px models two micro-conditions (resolution and aspect ratio). Each is an option of the reference model
(ModelConfig); the mapping below renames tensors, nothing more, except for learned-sigma models, whose
variance output channels are dropped (samplers use the noise prediction only; diffusers' PixArt pipelines
drop them too).
"""

from __future__ import annotations

import torch

from edgecompile.errors import EdgeCompileError
from edgecompile.model.config import ModelConfig, width_key
from edgecompile.model.dit import EfficientDiT
from edgecompile.model.importers.diffusers_folder import DiffusersFolder

CLASS_NAMES = ("PixArtTransformer2DModel",)
DEFAULT_TEXT_LEN = {True: 120, False: 300}  # the pipelines' max_sequence_length: PixArt-alpha (micro-conditions), Sigma
W = width_key(1.0)  # an imported model has one width

# Reference-model name <- diffusers name, for the tensors outside the blocks (weight and bias of each linear).
TOP = {
    "patch_embed": "pos_embed.proj",
    "t_mlp1": "adaln_single.emb.timestep_embedder.linear_1",
    "t_mlp2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block": "adaln_single.linear",
    "res_mlp1": "adaln_single.emb.resolution_embedder.linear_1",
    "res_mlp2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_mlp1": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_mlp2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "caption_proj1": "caption_projection.linear_1",
    "caption_proj2": "caption_projection.linear_2",
    "final": "proj_out",
}
BLOCK = {
    "attn.q": "attn1.to_q", "attn.k": "attn1.to_k", "attn.v": "attn1.to_v", "attn.out": "attn1.to_out.0",
    "cross.q": "attn2.to_q", "cross.k": "attn2.to_k", "cross.v": "attn2.to_v", "cross.out": "attn2.to_out.0",
    "ffn.fc1": "ff.net.0.proj", "ffn.fc2": "ff.net.2",
}
# What the reference model computes; a config asking for anything else is refused rather than approximated.
REQUIRED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "attention_type": "default"}


def _field(folder: DiffusersFolder, key: str, default=None):
    return folder.config.get(key, default)


def check_supported(folder: DiffusersFolder) -> None:
    where = folder.path / "config.json"
    for key, want in REQUIRED.items():
        have = _field(folder, key, want)
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float)) and abs(have - want) < 1e-12):
            raise EdgeCompileError(f"{where}: {key} = {have!r} is not supported (edgecompile imports PixArt's {want!r})")
    if not isinstance(_field(folder, "sample_size"), int):
        raise EdgeCompileError(f"{where}: sample_size must be one whole number (PixArt's square default latent)")
    if folder.scheduler is not None:
        s = folder.scheduler
        if s.get("prediction_type", "epsilon") != "epsilon" or s.get("beta_schedule", "linear") != "linear":
            raise EdgeCompileError(f"{folder.path.parent / 'scheduler' / 'scheduler_config.json'}: edgecompile imports epsilon "
                                   "prediction with linear betas (PixArt's DDPM schedule)")


def uses_micro_conditions(folder: DiffusersFolder) -> bool:
    """diffusers' rule: on when the config says so, else exactly for sample_size 128 (the 1024px alpha models)."""
    flag = _field(folder, "use_additional_conditions")
    return bool(flag) if flag is not None else _field(folder, "sample_size") == 128


def to_config(folder: DiffusersFolder, text_len: int | None = None, name: str | None = None) -> ModelConfig:
    check_supported(folder)
    heads, head_dim = int(_field(folder, "num_attention_heads", 16)), int(_field(folder, "attention_head_dim", 72))
    hidden = heads * head_dim
    patch, sample = int(_field(folder, "patch_size", 2)), int(_field(folder, "sample_size"))
    caption = _field(folder, "caption_channels")
    micro = uses_micro_conditions(folder)
    fc1 = folder.tensors.get("transformer_blocks.0.ff.net.0.proj.weight")
    if fc1 is None:
        raise EdgeCompileError(f"{folder.path}: the weights hold no transformer_blocks.0.ff.net.0.proj.weight: is this a PixArt checkpoint?")
    scheduler = folder.scheduler or {}
    interpolation = _field(folder, "interpolation_scale")
    return ModelConfig(
        name=name or "pixart", latent_channels=int(_field(folder, "in_channels", 4)), patch_size=patch, sample_size=(sample, sample),
        hidden_dim=hidden, head_dim=head_dim, num_heads=heads, num_kv_heads=heads,
        text_dim=int(caption if caption is not None else _field(folder, "cross_attention_dim", hidden)),
        text_len=int(text_len or DEFAULT_TEXT_LEN[micro]),
        depth_down=0, depth_middle=int(_field(folder, "num_layers", 28)), depth_up=0,
        ffn_ratio=fc1.shape[0] / hidden, ffn_ratio_middle=fc1.shape[0] / hidden,
        down_up_attention="full", stage_downsample=False, middle_skips=False, widths=(1.0,),
        prediction="epsilon", train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        beta_start=float(scheduler.get("beta_start", 0.0001)), beta_end=float(scheduler.get("beta_end", 0.02)),
        cross_attention_norm=False, caption_projection=caption is not None, micro_conditions=micro,
        position_table="pixart", position_base_size=sample // patch,
        position_interpolation_scale=float(interpolation if interpolation is not None else max(sample // 64, 1)),
    )


def to_reference(folder: DiffusersFolder, text_len: int | None = None, name: str | None = None) -> EfficientDiT:
    """The reference model holding the folder's weights (fp32)."""
    config = to_config(folder, text_len, name)
    src = folder.tensors
    out_channels = int(_field(folder, "out_channels") or config.latent_channels)
    if out_channels not in (config.latent_channels, 2 * config.latent_channels):
        raise EdgeCompileError(f"{folder.path / 'config.json'}: out_channels {out_channels} is neither in_channels nor twice it "
                               "(learned sigma)")
    names: dict[str, str] = {}  # reference name -> diffusers name
    for ours, theirs in TOP.items():
        for kind in ("weight", "bias"):
            names[f"{ours}.{kind}"] = f"{theirs}.{kind}"
    for i in range(config.depth_middle):
        names[f"middle.{i}.scale_shift_table.{W}"] = f"transformer_blocks.{i}.scale_shift_table"
        for ours, theirs in BLOCK.items():
            for kind in ("weight", "bias"):
                names[f"middle.{i}.{ours}.{kind}"] = f"transformer_blocks.{i}.{theirs}.{kind}"
    names[f"final_table.{W}"] = "scale_shift_table"

    with torch.device("meta"):
        model = EfficientDiT(config)
    expected = model.state_dict()
    state, problems = {}, []
    for key, param in expected.items():
        theirs = names.get(key)
        tensor = src.get(theirs) if theirs else None
        if tensor is None and key.endswith(".bias") and theirs is not None and theirs.replace(".bias", ".weight") in src:
            tensor = torch.zeros(param.shape)  # attention_bias=False: a zero bias computes the same
        if tensor is None:
            problems.append(f"missing {theirs or key}")
            continue
        tensor = tensor.float()
        if key.startswith("final.") and out_channels != config.latent_channels:
            tensor = drop_learned_sigma(tensor, config.patch_size, config.latent_channels)
        if tensor.shape != param.shape:
            problems.append(f"{theirs} is {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            continue
        state[key] = tensor
    unused = sorted(set(src) - set(names.values()))
    if unused:
        problems.append(f"{len(unused)} tensor(s) this mapping does not know, e.g. {unused[0]}")
    if problems:
        raise EdgeCompileError(f"{folder.path}: the weights do not match a PixArtTransformer2DModel of this config.json "
                               f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''})")
    model.load_state_dict(state, assign=True)
    return model.eval()


def drop_learned_sigma(t: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """proj_out rows are ordered (p, q, c) over 2C channels, the last C the variance: keep the first C of each."""
    return t.reshape(patch, patch, 2 * channels, *t.shape[1:])[:, :, :channels].reshape(patch * patch * channels, *t.shape[1:])


def describe(folder: DiffusersFolder) -> dict:
    """What the import did, for the checkpoint's provenance."""
    out_channels = int(_field(folder, "out_channels") or _field(folder, "in_channels", 4))
    return {"learned_sigma_dropped": out_channels != int(_field(folder, "in_channels", 4)),
            "micro_conditions": uses_micro_conditions(folder), "scheduler_config": folder.scheduler is not None}

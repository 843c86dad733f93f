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
from edgecompile.model.fields import Fields

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


def fields(folder: DiffusersFolder) -> Fields:
    return Fields(folder.config, folder.path / "config.json")


def scheduler_fields(folder: DiffusersFolder) -> Fields:
    return Fields(folder.scheduler or {}, folder.path.parent / "scheduler" / "scheduler_config.json")


def check_supported(folder: DiffusersFolder) -> None:
    where = folder.path / "config.json"
    for key, want in REQUIRED.items():
        have = folder.config.get(key, want)
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool)
                                 and abs(have - want) < 1e-12):
            raise EdgeCompileError(f"{where}: {key} = {have!r} is not supported (edgecompile imports PixArt's {want!r})")
    if isinstance(folder.config.get("sample_size"), bool) or not isinstance(folder.config.get("sample_size"), int):
        raise EdgeCompileError(f"{where}: sample_size must be one whole number (PixArt's square default latent)")
    if folder.scheduler is not None:
        s = folder.scheduler
        if s.get("prediction_type", "epsilon") != "epsilon" or s.get("beta_schedule", "linear") != "linear":
            raise EdgeCompileError(f"{folder.path.parent / 'scheduler' / 'scheduler_config.json'}: edgecompile imports epsilon "
                                   "prediction with linear betas (PixArt's DDPM schedule)")


def uses_micro_conditions(folder: DiffusersFolder) -> bool:
    """diffusers' rule: on when the config says so, else exactly for sample_size 128 (the 1024px alpha models)."""
    flag = fields(folder).bool("use_additional_conditions", None)
    return flag if flag is not None else folder.config.get("sample_size") == 128


def to_config(folder: DiffusersFolder, text_len: int | None = None, name: str | None = None) -> ModelConfig:
    """The reference-model config of the folder, every field read checked (type, range, consistency with the tensors)."""
    check_supported(folder)
    f, s = fields(folder), scheduler_fields(folder)
    heads, head_dim = f.int("num_attention_heads", 16, maximum=1024), f.int("attention_head_dim", 72, maximum=4096)
    hidden = heads * head_dim
    patch, sample = f.int("patch_size", 2, maximum=64), f.int("sample_size", maximum=4096)
    if sample % patch:
        raise EdgeCompileError(f"{folder.path / 'config.json'}: sample_size {sample} is not a multiple of patch_size {patch}")
    caption = f.optional_int("caption_channels", maximum=65536)
    has_caption_weights = any(k.startswith("caption_projection.") for k in folder.tensors)
    if (caption is not None) != has_caption_weights:
        raise EdgeCompileError(f"{folder.path / 'config.json'}: caption_channels is {caption!r} but the weights "
                               f"{'hold' if has_caption_weights else 'lack'} caption_projection tensors: set caption_channels to "
                               "the text encoder's width (4096 for T5-XXL) or use the weights saved with this config")
    micro = uses_micro_conditions(folder)
    fc1 = folder.tensors.get("transformer_blocks.0.ff.net.0.proj.weight")
    if fc1 is None:
        raise EdgeCompileError(f"{folder.path}: the weights hold no transformer_blocks.0.ff.net.0.proj.weight: is this a PixArt checkpoint?")
    interpolation = f.optional_float("interpolation_scale", minimum=0.0, maximum=1000.0, open_minimum=True)
    train_timesteps = s.int("num_train_timesteps", 1000, minimum=2, maximum=100_000)
    beta_start = s.float("beta_start", 0.0001, minimum=0.0, maximum=1.0, open_minimum=True)
    beta_end = s.float("beta_end", 0.02, minimum=beta_start, maximum=1.0)
    return ModelConfig(
        name=name or "pixart", latent_channels=f.int("in_channels", 4, maximum=1024), patch_size=patch, sample_size=(sample, sample),
        hidden_dim=hidden, head_dim=head_dim, num_heads=heads, num_kv_heads=heads,
        text_dim=caption if caption is not None else f.int("cross_attention_dim", hidden, maximum=65536),
        text_len=int(text_len or DEFAULT_TEXT_LEN[micro]),
        depth_down=0, depth_middle=f.int("num_layers", 28, maximum=1000), depth_up=0,
        ffn_ratio=fc1.shape[0] / hidden, ffn_ratio_middle=fc1.shape[0] / hidden,
        down_up_attention="full", stage_downsample=False, middle_skips=False, widths=(1.0,),
        prediction="epsilon", train_timesteps=train_timesteps, beta_start=beta_start, beta_end=beta_end,
        cross_attention_norm=False, caption_projection=caption is not None, micro_conditions=micro, text_mask=True,
        position_table="pixart", position_base_size=sample // patch,
        position_interpolation_scale=interpolation if interpolation is not None else float(max(sample // 64, 1)),
    )


def diffusers_names(config: ModelConfig) -> dict[str, str]:
    """Reference-model tensor name -> diffusers tensor name, for every tensor of a PixArt model of `config`."""
    names: dict[str, str] = {}
    for ours, theirs in TOP.items():
        for kind in ("weight", "bias"):
            names[f"{ours}.{kind}"] = f"{theirs}.{kind}"
    for i in range(config.depth_middle):
        names[f"middle.{i}.scale_shift_table.{W}"] = f"transformer_blocks.{i}.scale_shift_table"
        for ours, theirs in BLOCK.items():
            for kind in ("weight", "bias"):
                names[f"middle.{i}.{ours}.{kind}"] = f"transformer_blocks.{i}.{theirs}.{kind}"
    names[f"final_table.{W}"] = "scale_shift_table"
    return names


def to_diffusers(model: EfficientDiT, transformer_config: dict):
    """The reference model back as diffusers' PixArtTransformer2DModel (fp32, eval), the config it was imported
    from (a learned-sigma model comes back without its dropped variance channels): the model diffusers' own PixArt
    pipelines run, for comparing a package's pictures with diffusers' (`sample --compare`)."""
    import diffusers

    cfg = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    cfg["out_channels"] = model.config.latent_channels  # the variance channels are not in the checkpoint
    transformer = diffusers.PixArtTransformer2DModel.from_config(cfg)
    ours = model.state_dict()
    state = {theirs: ours[k].float() for k, theirs in diffusers_names(model.config).items() if k in ours}
    wanted = transformer.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise EdgeCompileError(f"the checkpoint does not map back onto a PixArtTransformer2DModel of its import config (no {missing[0]})")
    transformer.load_state_dict({k: state[k].reshape(v.shape) for k, v in wanted.items()}, strict=True)
    return transformer.eval()


def to_reference(folder: DiffusersFolder, text_len: int | None = None, name: str | None = None) -> EfficientDiT:
    """The reference model holding the folder's weights (fp32)."""
    config = to_config(folder, text_len, name)
    src = folder.tensors
    out_channels = fields(folder).optional_int("out_channels", maximum=2048) or config.latent_channels
    if out_channels not in (config.latent_channels, 2 * config.latent_channels):
        raise EdgeCompileError(f"{folder.path / 'config.json'}: out_channels {out_channels} is neither in_channels nor twice it "
                               "(learned sigma)")
    names = diffusers_names(config)
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
    f = fields(folder)
    in_channels = f.int("in_channels", 4, maximum=1024)
    out_channels = f.optional_int("out_channels", maximum=2048) or in_channels
    return {"learned_sigma_dropped": out_channels != in_channels,
            "micro_conditions": uses_micro_conditions(folder), "scheduler_config": folder.scheduler is not None,
            "scheduler": folder.scheduler}

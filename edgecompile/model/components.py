"""The rest of a text-to-image pipeline kept beside the denoiser in a checkpoint folder, as the diffusers layout
names them: `text_encoder/` (transformers T5EncoderModel, CLIPTextModel[WithProjection]), `tokenizer/` (a fast
tokenizer's tokenizer.json) and `vae/` (diffusers AutoencoderKL / AutoencoderTiny). `edgecompile import PIPELINE`
copies them in; `export --pipeline` compiles them.

Each folder is checked as data before any library reads it (the config's class and fields, safetensors weights
only: a pickled .bin is refused, since loading one runs code); transformers and diffusers then load them from the
local folder alone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edgecompile.errors import EdgeCompileError
from edgecompile.model.fields import Fields, read_json_object

TEXT_ENCODER, TOKENIZER, VAE = "text_encoder", "tokenizer", "vae"
FOLDERS = (TEXT_ENCODER, TOKENIZER, VAE)
TEXT_ENCODER_CLASSES = ("T5EncoderModel", "CLIPTextModel", "CLIPTextModelWithProjection")
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast", "CLIPTokenizer", "CLIPTokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend")
PICKLED = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "pytorch_model.bin.index.json")
KEPT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")  # configs, weights, vocabularies; nothing executable


def _json(path: Path) -> dict:
    return read_json_object(path, "config")


def _refuse_pickles(folder: Path) -> None:
    for name in PICKLED:
        if (folder / name).exists() and not any(folder.glob("*.safetensors")):
            raise EdgeCompileError(f"{folder} holds pickled weights ({name}), which edgecompile does not load (loading them runs code): "
                                   "re-save them with save_pretrained(folder, safe_serialization=True)")


def text_encoder_class(folder: Path) -> str:
    """The transformers class of a text_encoder/ folder, its config fields and weights checked."""
    config = _json(folder / "config.json")
    classes = config.get("architectures")
    name = classes[0] if isinstance(classes, list) and classes and isinstance(classes[0], str) else None
    if name not in TEXT_ENCODER_CLASSES:
        raise EdgeCompileError(f"{folder / 'config.json'}: text encoder class {name!r} is not supported: edgecompile compiles "
                               f"{', '.join(TEXT_ENCODER_CLASSES)}")
    f = Fields(config, folder / "config.json")
    f.int("vocab_size", maximum=10_000_000)
    if name == "T5EncoderModel":
        for key in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance"):
            f.int(key, maximum=1_000_000)
    else:
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            f.int(key, maximum=1_000_000)
    _refuse_pickles(folder)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise EdgeCompileError(f"{folder} has no model.safetensors: save the text encoder with save_pretrained(..., safe_serialization=True)")
    return name


def vae_class(folder: Path) -> str:
    config = _json(folder / "config.json")
    name = config.get("_class_name")
    if name not in VAE_CLASSES:
        raise EdgeCompileError(f"{folder / 'config.json'}: VAE class {name!r} is not supported: edgecompile compiles {', '.join(VAE_CLASSES)}")
    f = Fields(config, folder / "config.json")
    f.int("latent_channels", maximum=1024)
    f.optional_float("scaling_factor", minimum=0.0, open_minimum=True, maximum=1e6)
    f.optional_float("shift_factor", minimum=-1e6, maximum=1e6)
    _refuse_pickles(folder)
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise EdgeCompileError(f"{folder} has no diffusion_pytorch_model.safetensors: save the VAE with save_pretrained")
    return name


def tokenizer_file(folder: Path) -> Path:
    """The fast tokenizer's tokenizer.json, its class checked."""
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        name = _json(cfg_path).get("tokenizer_class")
        if name is not None and name not in TOKENIZER_CLASSES:
            raise EdgeCompileError(f"{cfg_path}: tokenizer class {name!r} is not supported: edgecompile reads fast tokenizers "
                                   f"({', '.join(TOKENIZER_CLASSES)})")
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EdgeCompileError(f"{folder} has no tokenizer.json: save the fast tokenizer (PreTrainedTokenizerFast.save_pretrained)")
    data = _json(path)
    vocab = (data.get("model") or {}).get("vocab")
    if not isinstance(vocab, (dict, list)) or not vocab:
        raise EdgeCompileError(f"{path} has no model vocabulary: is it a tokenizers file?")
    return path


def tokenizer_vocab_size(path: Path) -> int:
    data = _json(path)
    vocab = data["model"]["vocab"]
    added = [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    return max(len(vocab), max(added, default=-1) + 1)


CHECKS = {TEXT_ENCODER: text_encoder_class, VAE: vae_class, TOKENIZER: tokenizer_file}


def check_folders(root: Path) -> dict[str, Path]:
    """The component folders present under `root`, each checked: {kind: folder}."""
    found = {}
    for kind in FOLDERS:
        folder = root / kind
        if folder.is_dir():
            CHECKS[kind](folder)
            found[kind] = folder
    return found


def copy_folders(found: dict[str, Path], dest: Path) -> None:
    """Copy each component folder's data files (configs, safetensors, vocabularies) into `dest/<kind>/`."""
    for kind, folder in found.items():
        (dest / kind).mkdir()
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix in KEPT_SUFFIXES:
                shutil.copyfile(f, dest / kind / f.name)


@dataclass
class PipelineParts:
    """The loaded components (transformers and diffusers modules, fp32, eval mode) and the tokenizer file."""

    text_encoder: object
    vae: object
    tokenizer: Path


def load_parts(components: dict[str, Path], text_dim: int, where: str) -> PipelineParts:
    """The checkpoint's text encoder, VAE and tokenizer, each present and consistent with the denoiser (`text_dim`)
    and with each other (the tokenizer's vocabulary fits the encoder's embedding table)."""
    missing = [k for k in FOLDERS if k not in components]
    if missing:
        raise EdgeCompileError(f"{where} has no {', '.join(f'{m}/' for m in missing)}: --pipeline compiles the text encoder, tokenizer "
                               "and VAE beside the denoiser; import the pipeline folder (`edgecompile import PIPELINE -o CKPT`) or "
                               "copy them in as save_pretrained writes them")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()  # their loading bars and "install accelerate" notes are not ours to print
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    name = text_encoder_class(components[TEXT_ENCODER])
    encoder = getattr(transformers, name).from_pretrained(str(components[TEXT_ENCODER]), local_files_only=True, use_safetensors=True).eval()
    encoder = encoder.float()
    vae = getattr(diffusers, vae_class(components[VAE])).from_pretrained(str(components[VAE]), local_files_only=True,
                                                                         use_safetensors=True).eval().float()
    tok = tokenizer_file(components[TOKENIZER])
    rows = encoder.get_input_embeddings().weight.shape[0]
    if tokenizer_vocab_size(tok) > rows:
        raise EdgeCompileError(f"{tok}: the tokenizer's vocabulary ({tokenizer_vocab_size(tok)} tokens) does not fit the text encoder's "
                               f"embedding table ({rows} rows): the tokenizer belongs to another encoder")
    width = encoder.config.d_model if name == "T5EncoderModel" else encoder.config.hidden_size
    if width != text_dim:
        raise EdgeCompileError(f"{where}: the text encoder outputs {width} channels but the denoiser takes {text_dim}: "
                               "the components belong to different pipelines")
    return PipelineParts(text_encoder=encoder, vae=vae, tokenizer=tok)

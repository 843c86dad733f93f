"""The checkpoint users hand to edgecompile: a folder, loaded without executing any code.

    CKPT/
      checkpoint.json      {"format": "edgecompile-checkpoint", "format_version": 1,
                            "model": {config fields}, "dtype": "float32|float16|bfloat16",
                            "extracted_width": null | w, "provenance": {...}}
      model.safetensors    the supernetwork state dict (names as in EfficientDiT.state_dict())
      prompts.safetensors  optional: "tokens" (N, T, text_dim) conditioning sequences, "null" (1, T, text_dim)
                           the unconditional sequence for CFG; metadata "labels" = JSON list of N names

Loading validates everything against the config and reports every problem in one clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgecompile.atomic import atomic_path, check_output_path
from edgecompile.errors import EdgeCompileError
from edgecompile.metrics import all_finite
from edgecompile.model.budget import check_weights_fit
from edgecompile.model.components import check_folders, copy_folders
from edgecompile.model.config import CONFIG_SUFFIXES, ModelConfig, shipped_config, shipped_config_names
from edgecompile.model.dit import EfficientDiT, randomize_untrained
from edgecompile.model.elastic import count_params, narrow_to_width

FORMAT = "edgecompile-checkpoint"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


@dataclass
class Prompts:
    """Conditioning sequences shipped with a checkpoint (for the toy model: one per digit class)."""

    tokens: torch.Tensor  # (N, T, text_dim)
    null: torch.Tensor  # (1, T, text_dim)
    labels: list[str]


@dataclass
class Checkpoint:
    config: ModelConfig
    model: EfficientDiT
    path: Path | None = None
    dtype: str = "float32"
    prompts: Prompts | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # the pipeline's other parts kept beside the denoiser (model/components.py): kind -> folder
    components: dict[str, Path] = field(default_factory=dict)


def save_checkpoint(
    model: EfficientDiT, dest: str | Path, dtype: str = "float32", prompts: Prompts | None = None,
    provenance: dict[str, Any] | None = None, force: bool = False, inputs=(), components: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint folder; `components` (checked folders, model/components.py) are copied in beside it."""
    if dtype not in DTYPES:
        raise EdgeCompileError(f"checkpoint dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    if model.narrowed_to is not None:
        raise ValueError(f"this model holds widths up to {model.narrowed_to:g} only: save a checkpoint from one loaded whole")
    dest = Path(dest)
    with atomic_path(dest, force=force, inputs=inputs) as tmp:
        tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT, "dtype": dtype})
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(), "dtype": dtype,
            "provenance": provenance or {},
        }
        if prompts is not None:
            save_file(
                {"tokens": prompts.tokens.float().contiguous(), "null": prompts.null.float().contiguous()},
                str(tmp / "prompts.safetensors"), metadata={"labels": json.dumps(prompts.labels)},
            )
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
        if components:
            copy_folders(components, tmp)
    return dest


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise EdgeCompileError(f"checkpoint {path} not found: pass a checkpoint folder (see `edgecompile init`)")
    if not path.is_dir():
        raise EdgeCompileError(f"checkpoint {path} is not a folder: a checkpoint is a folder with checkpoint.json and model.safetensors")
    meta_path = path / "checkpoint.json"
    if not meta_path.is_file():
        raise EdgeCompileError(f"checkpoint {path} has no checkpoint.json: is it an edgecompile checkpoint folder?")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeCompileError(f"checkpoint {path}: checkpoint.json is corrupt ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EdgeCompileError(f"checkpoint {path}: checkpoint.json is not an {FORMAT} file (missing 'format': '{FORMAT}')")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise EdgeCompileError(f"checkpoint {path}: format_version {version!r} is not a whole number (checkpoint.json must say "
                               f"\"format_version\": {FORMAT_VERSION}, without quotes)")
    if version != FORMAT_VERSION:
        raise EdgeCompileError(f"checkpoint {path}: format_version {version} is not supported (this edgecompile reads {FORMAT_VERSION})")
    if meta.get("dtype", "float32") not in DTYPES:
        raise EdgeCompileError(f"checkpoint {path}: dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    return meta


def _summarise(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def checkpoint_config(path: str | Path | None = None) -> ModelConfig:
    """The model config a checkpoint folder declares (checkpoint.json only: no weights read)."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    return ModelConfig.from_dict(read_checkpoint_meta(path).get("model"), source=f"checkpoint {path} (checkpoint.json 'model')")


def load_checkpoint(path: str | Path | None = None, width: float | None = None) -> Checkpoint:
    """Load and validate a checkpoint folder (the bundled default when `path` is None); weights become fp32.

    `width`: the largest width the caller will run (an export's widths, a package's): only what widths up to it read
    is converted, checked and kept (model/elastic.narrow_to_width), the model refusing larger widths. None, or the
    supernetwork's own width, keeps the whole supernetwork."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    meta = read_checkpoint_meta(path)
    config = ModelConfig.from_dict(meta.get("model"), source=f"checkpoint {path} (checkpoint.json 'model')")
    narrow = width is not None and width in config.widths and width < max(config.widths)
    stored = meta.get("dtype", "float32")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise EdgeCompileError(f"checkpoint {path} has no model.safetensors")
    with torch.device("meta"):  # no allocation: the loaded tensors become the parameters (assign=True)
        model = EfficientDiT(config)
    expected = model.state_dict()
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise EdgeCompileError(f"checkpoint {path}: model.safetensors is corrupt or truncated ({str(e).splitlines()[0]})") from None
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({_summarise(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_summarise(unexpected)})")
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) ({_summarise(shapes)})")
    dtypes = [f"{k} is {str(v.dtype).removeprefix('torch.')}" for k, v in tensors.items() if k in expected and v.dtype != DTYPES[stored]]
    if dtypes:
        problems.append(f"{len(dtypes)} tensor(s) not of the declared dtype {stored} ({_summarise(dtypes)})")
    if problems:
        raise EdgeCompileError(
            f"checkpoint {path} does not match its config {config.name!r}: " + "; ".join(problems)
            + " (was it saved from a different config?)"
        )
    if narrow:  # the stored tensors as they are, then the width's slices copied to fp32 and the rest let go
        model.load_state_dict(tensors, assign=True)
        tensors.clear()
        narrow_to_width(model, width, torch.float32)
        checked = dict(model.named_parameters())
    else:
        checked = tensors
    bad = [k for k, v in checked.items() if not all_finite(v)]
    if bad:
        raise EdgeCompileError(f"checkpoint {path}: tensor(s) {_summarise(bad)} hold NaN or infinite values: "
                               "fix or retrain the checkpoint (edgecompile will not compile non-finite weights)")
    if not narrow:
        model.load_state_dict({k: tensors.pop(k).float() for k in list(tensors)}, assign=True)
    model.eval()
    prompts = _load_prompts(path, config)
    return Checkpoint(config=config, model=model, path=path, dtype=stored, prompts=prompts, provenance=meta.get("provenance", {}),
                      components=check_folders(path))


def _load_prompts(path: Path, config: ModelConfig) -> Prompts | None:
    file = path / "prompts.safetensors"
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            tokens, null = f.get_tensor("tokens"), f.get_tensor("null")
            labels = json.loads((f.metadata() or {}).get("labels", "[]"))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise EdgeCompileError(f"checkpoint {path}: prompts.safetensors is corrupt ({str(e).splitlines()[0]})") from None
    if tokens.ndim != 3 or len(tokens) == 0 or tokens.shape[2] != config.text_dim or null.shape[-1] != config.text_dim:
        raise EdgeCompileError(
            f"checkpoint {path}: prompts.safetensors holds tokens of shape {tuple(tokens.shape)}, expected (N >= 1, T, {config.text_dim})"
        )
    if not (torch.isfinite(tokens).all() and torch.isfinite(null).all()):
        raise EdgeCompileError(f"checkpoint {path}: prompts.safetensors holds NaN or infinite values")
    return Prompts(tokens=tokens.float(), null=null.float().reshape(1, *null.shape[-2:]), labels=labels)


def load_config_or_checkpoint(path: str | Path | None) -> tuple[ModelConfig, Checkpoint | None]:
    """`info` and friends accept a YAML/JSON config or a checkpoint folder (default: the bundled checkpoint)."""
    if path is not None and Path(path).is_file() and Path(path).suffix in CONFIG_SUFFIXES:
        return ModelConfig.load(path), None
    if path is not None and not Path(path).exists():
        if shipped_config(path) is not None:
            return ModelConfig.load(path), None
        raise EdgeCompileError(f"{path} not found: looked for a checkpoint folder, a YAML/JSON config file and a config shipped "
                               f"with edgecompile of that name ({', '.join(shipped_config_names())})")
    ckpt = load_checkpoint(path)
    return ckpt.config, ckpt


def init_checkpoint(config_path: str | Path, output: str | Path, seed: int = 0, dtype: str = "float32", force: bool = False) -> int:
    """Write a randomly initialised checkpoint of a config (`edgecompile init`); returns its parameter count."""
    config = ModelConfig.load(config_path)
    check_output_path(Path(output), force, inputs=[config_path])
    check_weights_fit(count_params(config, 1.0), 4 + 2, f"init {config_path}")  # fp32 model + the saved copy
    torch.manual_seed(seed)
    model = randomize_untrained(EfficientDiT(config), seed)
    save_checkpoint(model, output, dtype=dtype, provenance={"init": "random", "seed": seed}, force=force, inputs=[config_path])
    return sum(p.numel() for p in model.parameters())

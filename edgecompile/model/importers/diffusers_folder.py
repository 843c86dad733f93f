"""A diffusers model folder read as data: config.json and safetensors weights (one file, or shards listed by
an .index.json weight map). Pickled weights (.bin) are refused: loading them would execute code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from edgecompile.errors import EdgeCompileError
from edgecompile.model.fields import read_json_object

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PICKLED = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


@dataclass
class DiffusersFolder:
    path: Path  # the model folder (a pipeline's transformer/)
    class_name: str
    config: dict
    tensors: dict[str, torch.Tensor]  # as stored (fp32, fp16 or bf16)
    scheduler: dict | None = None  # the pipeline's scheduler/scheduler_config.json, when there is one
    dtypes: list[str] = field(default_factory=list)


_json = read_json_object


def _model_folder(path: Path) -> tuple[Path, dict | None]:
    if not path.is_dir():
        raise EdgeCompileError(f"{path} is not a folder: pass a diffusers model folder (config.json + {WEIGHTS}) or a pipeline folder")
    scheduler = None
    if (path / "model_index.json").is_file():  # a pipeline: its denoiser and its scheduler
        if (path / "scheduler" / "scheduler_config.json").is_file():
            scheduler = _json(path / "scheduler" / "scheduler_config.json", "scheduler config")
        path = path / "transformer"
        if not path.is_dir():
            raise EdgeCompileError(f"{path.parent} is a diffusers pipeline without a transformer/ folder: "
                                   "edgecompile imports transformer (DiT) pipelines such as PixArt")
    if not (path / "config.json").is_file():
        raise EdgeCompileError(f"{path} is not a diffusers model folder (no config.json): pass the folder save_pretrained wrote")
    return path, scheduler


def read(path: Path) -> DiffusersFolder:
    folder, scheduler = _model_folder(path)
    config = _json(folder / "config.json", "model config")
    class_name = config.get("_class_name")
    if not isinstance(class_name, str):
        raise EdgeCompileError(f"{folder / 'config.json'} has no _class_name: it is not a diffusers model config")
    if (folder / INDEX).is_file():
        index = _json(folder / INDEX, "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise EdgeCompileError(f"{folder / INDEX} has no weight_map: re-save the model with save_pretrained")
        odd = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
        if odd is not None:
            raise EdgeCompileError(f"{folder / INDEX}: weight_map maps {odd[0]!r} to {odd[1]!r}, not a shard file name: "
                                   "re-save the model with save_pretrained")
        shards = sorted(set(weight_map.values()))
        outside = next((s for s in shards if Path(s).name != s or s in (".", "..")), None)
        if outside is not None:
            raise EdgeCompileError(f"{folder / INDEX} lists shard {outside!r}, a path outside the model folder: "
                                   "shards are file names in the folder itself; re-save the model with save_pretrained")
    elif (folder / WEIGHTS).is_file():
        weight_map, shards = None, [WEIGHTS]
    elif any((folder / p).exists() for p in PICKLED):
        raise EdgeCompileError(f"{folder} holds pickled weights (.bin), which edgecompile does not load (loading them runs code): "
                               "re-save them as safetensors, e.g. model.save_pretrained(folder, safe_serialization=True)")
    else:
        raise EdgeCompileError(f"{folder} has no {WEIGHTS} (nor a sharded {INDEX}): pass the folder save_pretrained wrote")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = folder / shard
        if not file.is_file():
            raise EdgeCompileError(f"{folder / INDEX} lists shard {shard!r}, which is missing from {folder}: download every shard")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise EdgeCompileError(f"{file} is corrupt or truncated ({str(e).splitlines()[0]}): download it again") from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise EdgeCompileError(f"{folder}: {len(missing)} tensor(s) of the weight map are in no shard (e.g. {missing[0]}): download every shard")
    odd = next(((k, t.dtype) for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES), None)
    if odd is not None:
        raise EdgeCompileError(f"{folder}: tensor {odd[0]} is {str(odd[1]).removeprefix('torch.')}; edgecompile imports float32, "
                               "float16 or bfloat16 weights (a quantized checkpoint would import as a garbage model): "
                               "pass the unquantized checkpoint")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return DiffusersFolder(path=folder, class_name=class_name, config=config, tensors=tensors, scheduler=scheduler, dtypes=dtypes)

"""Importers: public checkpoint families mapped into the one reference model (model/dit.py), one module per
source family. Each reads its source without executing code (JSON configs, safetensors weights) and returns
the reference model; `import_checkpoint` writes it as an edgecompile checkpoint that every command takes.

A new family (Sana, ...) adds a module with `CLASS_NAMES`, `describe` and `to_reference`, and registers it in
FAMILIES.
"""

from __future__ import annotations

from pathlib import Path

from edgecompile.errors import EdgeCompileError
from edgecompile.model.checkpoint import save_checkpoint
from edgecompile.model.components import check_folders
from edgecompile.model.fields import read_json_object
from edgecompile.model.importers import diffusers_folder, pixart

FAMILIES = {name: pixart for name in pixart.CLASS_NAMES}


def import_checkpoint(source: str | Path, output: str | Path, dtype: str = "float32", text_len: int | None = None,
                      name: str | None = None, force: bool = False) -> Path:
    """Read a diffusers transformer folder (or a pipeline folder's transformer/) and write an edgecompile
    checkpoint at `output`; returns `output`. Nothing is written when anything is wrong."""
    folder = diffusers_folder.read(Path(source))
    family = FAMILIES.get(folder.class_name)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise EdgeCompileError(f"{folder.path}: _class_name {folder.class_name!r} is not a family edgecompile imports "
                               f"(it imports {known})")
    model = family.to_reference(folder, text_len=text_len, name=name)
    # a pipeline folder's other parts (text encoder, tokenizer, VAE), each checked as data, are kept beside it
    components = check_folders(Path(source)) if folder.path != Path(source) else {}
    pipeline_class = None
    if components and (Path(source) / "model_index.json").is_file():  # the diffusers pipeline `sample --compare` runs
        name = read_json_object(Path(source) / "model_index.json", "pipeline index").get("_class_name")
        pipeline_class = name if isinstance(name, str) and len(name) < 100 else None
    provenance = {"import": {"source": str(Path(source).resolve()), "class_name": folder.class_name,
                             "pipeline_class": pipeline_class, "transformer_config": folder.config,
                             "diffusers_version": folder.config.get("_diffusers_version"), "source_dtypes": folder.dtypes,
                             "components": sorted(components), **family.describe(folder)}}
    return save_checkpoint(model, output, dtype=dtype, provenance=provenance, force=force, inputs=[Path(source)], components=components)

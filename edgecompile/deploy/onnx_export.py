"""The same deploy graph as ONNX (for Android runtimes, the paper's low-end target), same I/O names, fp32
weights, and the same edgecompile metadata as a Core ML package (metadata_props), so `inspect` and `verify`
read it back."""

from __future__ import annotations

import contextlib
import json
import io
import warnings
from pathlib import Path

import torch

from edgecompile.deploy.contract import OUTPUT, example_inputs, input_names
from edgecompile.deploy.dit import DeployDiT
from edgecompile.deploy.metadata import WEIGHTS_SHA256


def export_onnx(deploy: DeployDiT, path: str | Path, opset: int = 17, metadata: dict[str, str] | None = None,
                weights_digest=None) -> Path:
    """`weights_digest(initializers) -> {name: sha256}`, when given, is recorded in the metadata (weights_sha256)."""
    import onnx

    path = Path(path)
    example = example_inputs(deploy)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            deploy.eval(), example, str(path), input_names=input_names(deploy.config), output_names=[OUTPUT],
            opset_version=opset, dynamo=False,
        )
    if metadata or weights_digest:
        from onnx import numpy_helper

        model = onnx.load(str(path))
        meta = dict(metadata or {})
        if weights_digest is not None:
            digests = weights_digest({i.name: numpy_helper.to_array(i) for i in model.graph.initializer})
            meta[WEIGHTS_SHA256] = json.dumps(digests, sort_keys=True)
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(path))
    return path

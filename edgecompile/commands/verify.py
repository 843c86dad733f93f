"""`edgecompile verify`: execute a package written by `export` against the checkpoint it came from (the bundled
one by default); a palettized package against edgecompile's simulation rebuilt from the checkpoint and the
sidecars of its export folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgecompile.choices import Precision, Runtime
from edgecompile.compress.simulate import simulated_model_for_package
from edgecompile.coreml.generate import SampleSettings, generate
from edgecompile.coreml.package import PackageView, load_package
from edgecompile.coreml.verify import DEFAULT_MIN_PSNR_DB, VerifyResult, check_verifiable, checkpoint_for, verify_package
from edgecompile.errors import EdgeCompileError
from edgecompile.model.device import resolve_device


@dataclass(frozen=True)
class VerifyOptions:
    checkpoint: str | Path | None = None
    precision: Precision = Precision.FP32
    runtime: Runtime = Runtime.AUTO
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    device: str = "cpu"  # where the torch references run
    generate_with: SampleSettings | None = None  # also sample through the package with the checkpoint's prompts


def verify_exported(package: str | Path, checkpoint: str | Path | None = None, precision: str = "fp32", runtime: str = "auto",
                    min_psnr_db: float = DEFAULT_MIN_PSNR_DB, device: str = "cpu", generate_with: SampleSettings | None = None,
                    function: str | None = None) -> VerifyResult:
    """Verify one function of `package` (default: its default function; see `verify_every_function`). The torch
    references run on `device` (--device). With `generate_with`, also sample through the package with the
    checkpoint's prompts (`verify --generate`)."""
    opts = VerifyOptions(checkpoint=checkpoint, precision=Precision.parse(precision, "--precision"),
                         runtime=Runtime.parse(runtime, "--runtime"), min_psnr_db=min_psnr_db, device=device, generate_with=generate_with)
    return verify_view(load_package(package, function=function), opts)


def verify_view(view: PackageView, opts: VerifyOptions) -> VerifyResult:
    """`verify_exported` of a package already read back."""
    torch_device = resolve_device(opts.device)
    check_verifiable(view, opts.min_psnr_db)
    ckpt = checkpoint_for(view, opts.checkpoint)
    if opts.generate_with is not None:
        opts.generate_with.validate()
        if ckpt.prompts is None:
            raise EdgeCompileError(f"--generate samples with the checkpoint's prompts and {ckpt.path} ships none: "
                                   "use `edgecompile sample PACKAGE --prompts FILE` with your own text embeddings")
    result = verify_package(view, ckpt, simulated_model_for_package(view, ckpt, torch_device), precision=opts.precision,
                            runtime=opts.runtime, min_psnr_db=opts.min_psnr_db, device=torch_device)
    if opts.generate_with is not None:
        result.generation = generate(view, ckpt, ckpt.prompts, settings=opts.generate_with, runtime=opts.runtime, device=torch_device).summary()
    return result


def verify_every_function(package: str | Path, checkpoint: str | Path | None = None, precision: str = "fp32", runtime: str = "auto",
                          min_psnr_db: float = DEFAULT_MIN_PSNR_DB, device: str = "cpu",
                          generate_with: SampleSettings | None = None) -> list[VerifyResult]:
    """`verify_exported` of every function of a multifunction package, the default first (one result otherwise);
    the package is read once."""
    opts = VerifyOptions(checkpoint=checkpoint, precision=Precision.parse(precision, "--precision"),
                         runtime=Runtime.parse(runtime, "--runtime"), min_psnr_db=min_psnr_db, device=device, generate_with=generate_with)
    first = load_package(package)
    views = [first] + [first.with_function(name) for name in list(first.functions)[1:]]
    return [verify_view(view, opts) for view in views]

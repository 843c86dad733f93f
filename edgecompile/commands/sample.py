"""`edgecompile sample`: the app's sampling loop through a package, written as a labelled PNG grid; every input
is read and checked (`SampleOptions.resolve`) before any sampling starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgecompile.atomic import atomic_path, check_output_path
from edgecompile.choices import Runtime
from edgecompile.compress.calibration import load_user_prompts
from edgecompile.coreml.generate import SampleSettings, generate, grid_title, save_grid, select_prompts
from edgecompile.coreml.package import PackageView, load_package
from edgecompile.coreml.text_to_image import MANIFEST as TEXT_MANIFEST
from edgecompile.coreml.text_to_image import load_pipeline, save_images, text_to_image
from edgecompile.coreml.verify import GenerationSummary, checkpoint_for
from edgecompile.errors import EdgeCompileError
from edgecompile.model.checkpoint import Checkpoint, Prompts
from edgecompile.model.device import resolve_device

from edgecompile.commands.compression import Progress


@dataclass(frozen=True)
class SampleOptions:
    package: str | Path
    output: str | Path
    checkpoint: str | Path | None = None
    labels: list[str] | None = None
    prompts_file: str | Path | None = None
    settings: SampleSettings = field(default_factory=SampleSettings)
    compare: bool = False
    runtime: Runtime = Runtime.AUTO
    device: str = "cpu"
    force: bool = False
    function: str | None = None

    def resolve(self) -> SampleJob:
        self.settings.validate()
        runtime = Runtime.parse(self.runtime, "--runtime")
        output = Path(self.output)
        if output.suffix.lower() != ".png":
            raise EdgeCompileError(f"-o {output}: sample writes a PNG picture grid: give a path ending in .png, e.g. -o grid.png")
        inputs = [self.package, self.checkpoint, self.prompts_file]
        check_output_path(output, self.force, inputs=inputs)
        view = load_package(self.package, function=self.function)
        view.require_meta("sample")
        ckpt = checkpoint_for(view, self.checkpoint)
        prompts = ckpt.prompts
        if self.prompts_file is not None:
            tokens, null = load_user_prompts(self.prompts_file, ckpt.config)
            if null is None and self.settings.cfg_scale != 1.0:
                raise EdgeCompileError(f"prompts file {self.prompts_file} has no 'null' embedding, which guidance needs: add it or pass --cfg 1")
            prompts = Prompts(tokens=tokens, null=null if null is not None else torch.zeros_like(tokens[:1]),
                              labels=[f"prompt {i}" for i in range(len(tokens))])
        tokens, _, _ = select_prompts(prompts, self.labels, str(self.prompts_file or ckpt.path or "the checkpoint"))  # unknown labels fail here
        self.settings.validate(prompts=len(tokens))
        return SampleJob(options=self, view=view, ckpt=ckpt, prompts=prompts, output=output, runtime=runtime,
                         device=resolve_device(self.device), inputs=inputs)


@dataclass(frozen=True)
class SampleJob:
    """`edgecompile sample`, every input read and checked."""

    options: SampleOptions
    view: PackageView
    ckpt: Checkpoint
    prompts: Prompts
    output: Path
    runtime: Runtime
    device: torch.device
    inputs: list


def run_sample(job: SampleJob, progress: Progress | None = None) -> GenerationSummary:
    """The app's sampling loop through the package, written as a labelled PNG grid (with `compare`, the
    checkpoint's samples from the same noise as a second row)."""
    o = job.options
    result = generate(job.view, job.ckpt, job.prompts, o.labels, o.settings, compare=o.compare, runtime=job.runtime,
                      device=job.device, progress=progress)
    with atomic_path(job.output, force=o.force, is_dir=False, inputs=job.inputs) as target:
        save_grid(result.grid_rows(), result.labels, target, grid_title(result, job.view))
    return result.summary(grid=str(job.output))


def is_pipeline_folder(path: str | Path) -> bool:
    """A Resources folder written by `export --pipeline` (sample then runs prompt to picture)."""
    return Path(path).is_dir() and (Path(path) / TEXT_MANIFEST).is_file()


@dataclass(frozen=True)
class TextToImageOptions:
    """`edgecompile sample RESOURCES --prompt TEXT ...`: the whole pipeline through its packages."""

    resources: str | Path
    output: str | Path
    prompts: tuple[str, ...]
    checkpoint: str | Path | None = None
    settings: SampleSettings = field(default_factory=SampleSettings)
    noise: str | Path | None = None
    compare: bool = False
    runtime: Runtime = Runtime.AUTO
    force: bool = False

    def resolve(self):
        self.settings.validate(prompts=len(self.prompts))
        if self.settings.per_prompt != 1:
            raise EdgeCompileError("--per-prompt applies to embedding prompts: repeat --prompt TEXT instead, or pass --noise with more rows")
        output = Path(self.output)
        if output.suffix.lower() not in (".png", ".npy"):
            raise EdgeCompileError(f"-o {output}: give a .png (a picture grid) or a .npy ((N, H, W, 3) float32 in [0, 1]) path")
        if not self.prompts:
            raise EdgeCompileError("give the text to draw: --prompt \"a red fox\" (repeat it for several images)")
        inputs = [self.resources, self.checkpoint, self.noise]
        check_output_path(output, self.force, inputs=inputs)
        pipe = load_pipeline(self.resources)
        ckpt = checkpoint_for(pipe.denoiser, self.checkpoint)
        return pipe, ckpt, output, inputs


def run_text_to_image(opts: TextToImageOptions) -> dict:
    pipe, ckpt, output, inputs = opts.resolve()
    s = opts.settings
    result = text_to_image(pipe, ckpt, list(opts.prompts), steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed,
                           noise_file=Path(opts.noise) if opts.noise else None, compare=opts.compare, runtime=Runtime(opts.runtime).value)
    summary = result.summary()
    title = f"{pipe.resources}: {s.steps} steps, CFG {s.cfg_scale:g}, seed {s.seed}, {result.runtime}"
    if result.reference is not None:
        title += f"; vs {result.reference_name} {summary['final_image_psnr_db']} dB"
    with atomic_path(output, force=opts.force, is_dir=False, inputs=inputs) as target:
        save_images(result.images, result.prompts, target, title)
    return {**summary, "output": str(output)}

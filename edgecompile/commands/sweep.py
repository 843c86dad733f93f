"""`edgecompile sweep`: the export's calibrate -> statistics -> sweep path for one width, saved as a recipe for
`export --recipe`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgecompile.atomic import check_output_path
from edgecompile.choices import PaletteMethod
from edgecompile.compress.calibration import CalibrationSet
from edgecompile.compress.palettize_model import DEFAULT_PALETTE_METHOD, check_group_size, layer_shapes, palettizable_layers
from edgecompile.compress.recipe import Recipe
from edgecompile.model.budget import check_fits
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.device import resolve_device
from edgecompile.model.elastic import extract_width

from edgecompile.commands.compression import Progress, batch_plan, calibration_for, graph_at_calibration_size, palette_cache, sweep_recipe
from edgecompile.commands.options import SweepSettings, latent_arg, load_checked_calibration


@dataclass(frozen=True)
class ResolvedSweep:
    options: SweepOptions
    calibration: CalibrationSet | None  # the calibration file's set, loaded once
    device: torch.device


@dataclass(frozen=True)
class SweepOptions:
    output: Path
    width: float = 0.5
    settings: SweepSettings = field(default_factory=SweepSettings)
    palettes: PaletteMethod = DEFAULT_PALETTE_METHOD
    group_size: int | None = None
    calibration: Path | None = None
    latent_hw: tuple[int, int] | None = None  # the calibration latent when no file is given (default: sample_size)
    device: str = "auto"
    force: bool = False

    def resolve(self, ckpt: Checkpoint) -> ResolvedSweep:
        """Checked before any work; the calibration file is loaded once."""
        ckpt.config.check_trained_width(self.width)
        check_output_path(self.output, self.force, inputs=[ckpt.path, self.calibration])
        self.settings.validate("--candidates")
        PaletteMethod.parse(self.palettes, "--palettes")
        calib = load_checked_calibration(self.calibration, ckpt, [self.width]) if self.calibration else None
        if self.latent_hw is not None:
            ckpt.config.check_latent_size(*self.latent_hw)
            check_fits(ckpt.config, self.width, self.latent_hw, what=f"--calibration-latent {latent_arg(self.latent_hw)}")
        if self.group_size is not None:
            hw = calib.latent_hw if calib is not None else tuple(self.latent_hw or ckpt.config.sample_size)
            check_group_size(layer_shapes(ckpt.config, self.width, hw), self.group_size, self.width)
        return ResolvedSweep(options=self, calibration=calib, device=resolve_device(self.device))


def run_sweep(ckpt: Checkpoint, opts: SweepOptions, on_stage: Callable[[str], None] | None = None,
              progress: Progress | None = None) -> Recipe:
    run = opts.resolve(ckpt)
    on_stage = on_stage or (lambda _: None)
    on_stage("calibration inputs")
    calib = calibration_for(ckpt, opts.width, run.calibration, opts.latent_hw, run.device, progress)
    teacher = graph_at_calibration_size(extract_width(ckpt.model, opts.width, share=True), calib, device=run.device)
    on_stage(f"{opts.settings.mode} sweep")
    batches = batch_plan(ckpt, opts.width, calib, run.device, None)
    needed = dict.fromkeys(palettizable_layers(teacher), list(opts.settings.candidates))
    cache, scores = palette_cache(teacher, calib, opts.palettes, opts.group_size, opts.settings.mode, needed, batches, progress)
    recipe = sweep_recipe(teacher, ckpt.config.name, opts.width, calib, opts.settings, cache, progress, batches.inference, scores)
    recipe.save(opts.output, force=opts.force, inputs=[ckpt.path, opts.calibration])
    return recipe

"""Sensitivity-sweep cost at paper scale: the 0.4B width of recipes/snapgenpp.yaml (random-initialised), a few
calibration inputs at a reduced resolution. Prints, for the propagated sweep (the default: layer statistics
from one forward pass and a backward pass on a third of the inputs, then output-aware palettes) and the local
sweep (plain k-means palettes, one forward pass with a hook per layer), the wall time and the cost in forward
passes of the calibration set (measured in the same run), and what the e2e sweep would cost (layers x
bit-widths passes, an estimate from the measured forward time: running it is the point of avoiding it).

    python benchmarks/sweep_scale.py [--width 0.5] [--latent 32x32] [--output DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import torch

from edgecompile.compress.calibration import build_calibration, random_prompts
from edgecompile.compress.importance import measure_statistics
from edgecompile.compress.palettize_model import PaletteCache, palettizable_layers
from edgecompile.compress.sensitivity import sweep
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.model.config import ModelConfig
from edgecompile.model.dit import EfficientDiT, randomize_untrained
from edgecompile.model.elastic import narrow_to_width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "snapgenpp.yaml"))
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--latent", default="32x32")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--output")
    args = ap.parse_args()
    config = ModelConfig.load(args.config)
    hw = tuple(int(v) for v in args.latent.split("x"))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = randomize_untrained(EfficientDiT(config), 0).eval()
    narrow_to_width(model, args.width)  # what `export --width W` holds of a checkpoint (load_checkpoint(path, width=W))
    init_s = time.perf_counter() - t0
    tokens, null = random_prompts(config, args.prompts, 0)
    t0 = time.perf_counter()
    calib = build_calibration(model, args.width, tokens, null, hw, schedules=(4,), seed=0)
    calib_s = time.perf_counter() - t0
    deploy = deploy_model(model, args.width, latent_hw=hw)
    results = {}
    for mode, method in (("propagated", "output-aware"), ("local", "plain")):
        cache = PaletteCache(deploy) if method == "plain" else None
        if cache is None:
            stats = measure_statistics(deploy, palettizable_layers(deploy), calib, batch_size=4)
            cache = PaletteCache(deploy, None, method, stats)
        result = sweep(deploy, calib, [4, 8], mode, cache, batch_size=4)
        results[mode] = {**result.to_dict(), "palettes": method, "rounding_seconds": round(cache.rounding_seconds, 1),
                         "peak_rss_gib": round(_common.peak_rss_gib(), 2)}
        print(f"{mode} sweep ({method} palettes): {result.seconds:.1f} s ({result.kmeans_seconds:.1f} s palettes), "
              f"{result.cost_forward_passes:.2f} forward passes of {result.forward_seconds:.1f} s")
        del cache
        stats = None  # the propagated sweep's statistics are not the local sweep's memory
    n_layers = len(result.sizes)
    out = {
        "config": args.config, "width": args.width, "latent": list(hw), "calibration_inputs": len(calib),
        "params": sum(p.numel() for p in deploy.parameters()), "palettizable_layers": n_layers,
        "init_seconds": round(init_s, 1), "calibration_seconds": round(calib_s, 1), "sweeps": results,
        "e2e_forward_passes": 2 * n_layers, "e2e_estimated_seconds": round(2 * n_layers * result.forward_seconds, 1),
        "peak_rss_gib": round(_common.peak_rss_gib(), 2),
    }
    print(f"{n_layers} layers, {len(calib)} calibration inputs at {args.latent}; "
          f"e2e would be {2 * n_layers} passes, about {out['e2e_estimated_seconds']:.0f} s (estimate)")
    print(f"wrote {_common.write_result('sweep_scale', out, Path(args.output) if args.output else None)}")


if __name__ == "__main__":
    main()

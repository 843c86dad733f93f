"""What the fp32 timestep island buys, measured with the faithful fp16 emulation (the interpreter follows the
package's own dtypes): fp16 packages converted with the island (what `export` writes) and without it (a naive
all-fp16 conversion), each verified on the same inputs. Two checkpoints: the bundled one (trained; verification
inputs are points of its own 4-step trajectories) and a randomly initialised GQA config (random inputs), the
case where the island matters most.

    python benchmarks/fp16_island.py [--widths 0.375,0.5,1.0] [--output benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import write_result

RANDOM_GQA = {"name": "random_gqa", "hidden_dim": 64, "head_dim": 8, "num_heads": 8, "num_kv_heads": 2, "text_dim": 16,
              "text_len": 3, "depth_down": 1, "depth_middle": 2, "depth_up": 1, "widths": [0.5, 1.0], "bna_blocks": 4}


def measure(ckpt_path: Path | None, widths: list[float], tmp: Path, label: str) -> tuple[list[dict], dict]:
    from edgecompile.coreml.convert import convert_to_mlmodel, set_metadata
    from edgecompile.coreml.verify import verification_inputs
    from edgecompile.deploy.contract import PackageInfo
    from edgecompile.deploy.rewrite import deploy_model
    from edgecompile.digest import sha256_file
    from edgecompile.export import verify_exported
    from edgecompile.model.checkpoint import load_checkpoint
    from edgecompile.model.elastic import count_params

    ckpt = load_checkpoint(ckpt_path)
    rows, timesteps = [], {}
    for width in widths:
        if width not in ckpt.config.widths:
            continue
        deploy = deploy_model(ckpt.model, width)
        timesteps[width] = [round(float(t), 4) for _, t, _ in verification_inputs(ckpt.config, ckpt.config.sample_size, ckpt=ckpt, width=width)]
        info = PackageInfo(width=width, params=count_params(ckpt.config, width), config=ckpt.config.to_dict(),
                           checkpoint_sha256=sha256_file(ckpt.path / "model.safetensors"))
        for island in (True, False):
            ml = convert_to_mlmodel(deploy, fp32_timestep_island=island)
            set_metadata(ml, info, deploy)
            path = tmp / f"{label}_w{width}_{island}.mlpackage"
            ml.save(str(path))
            for precision in ("fp32", "fp16"):
                r = verify_exported(path, checkpoint=ckpt_path, precision=precision, runtime="interpreter")
                rows.append({"checkpoint": label, "width": width, "fp32_timestep_island": island, "emulation": precision,
                             "psnr_db_per_input": [round(v, 2) for v in r.per_input_psnr_db], "worst_psnr_db": round(r.psnr_db, 2)})
                print(rows[-1], flush=True)
    return rows, timesteps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="0.375,0.5,1.0")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from edgecompile.model.checkpoint import save_checkpoint
    from edgecompile.model.config import ModelConfig
    from edgecompile.model.dit import EfficientDiT, randomize_untrained

    widths = [float(w) for w in args.widths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "gqa.json").write_text(json.dumps(RANDOM_GQA))
        torch.manual_seed(0)
        save_checkpoint(randomize_untrained(EfficientDiT(ModelConfig.load(tmp / "gqa.json")), 0), tmp / "gqa_ckpt",
                        provenance={"init": "random", "seed": 0})
        bundled, bundled_t = measure(None, widths, tmp, "bundled")
        random, random_t = measure(tmp / "gqa_ckpt", widths, tmp, "random_gqa")
    write_result("fp16_island", {"inputs": {"bundled": "verify's inputs: points of the checkpoint's own 4-step trajectories",
                                            "random_gqa": "verify's inputs: random latents and prompts, seeded"},
                                 "random_gqa_config": RANDOM_GQA, "timesteps_per_width": {"bundled": bundled_t, "random_gqa": random_t},
                                 "rows": bundled + random}, args.output)


if __name__ == "__main__":
    main()

"""What the fp32 timestep island buys, measured with the faithful fp16 emulation (the interpreter follows the
package's own dtypes): the bundled checkpoint's fp16 package of each width, converted with the island (what
`export` writes) and without it (a naive all-fp16 conversion), each verified on the same trajectory inputs.

    python benchmarks/fp16_island.py [--widths 0.375,0.5,1.0] [--output benchmarks/results]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="0.375,0.5,1.0")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    from edgecompile.coreml.convert import PackageInfo, convert_to_mlmodel, set_metadata, sha256_file
    from edgecompile.coreml.verify import verification_inputs, verify_package
    from edgecompile.deploy.convert import deploy_model
    from edgecompile.model.checkpoint import load_checkpoint
    from edgecompile.model.elastic import count_params

    ckpt = load_checkpoint()
    rows, timesteps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for width in (float(w) for w in args.widths.split(",")):
            deploy = deploy_model(ckpt.model, width)
            timesteps[width] = [round(float(t), 4) for _, t, _ in verification_inputs(ckpt.config, ckpt.config.sample_size, ckpt=ckpt, width=width)]
            info = PackageInfo(width=width, params=count_params(ckpt.config, width), config=ckpt.config.to_dict(),
                               checkpoint_sha256=sha256_file(ckpt.path / "model.safetensors"))
            for island in (True, False):
                ml = convert_to_mlmodel(deploy, fp32_timestep_island=island)
                set_metadata(ml, info, deploy)
                path = Path(tmp) / f"w{width}_{island}.mlpackage"
                ml.save(str(path))
                for precision in ("fp32", "fp16"):
                    r = verify_package(path, precision=precision, runtime="interpreter")
                    rows.append({"width": width, "fp32_timestep_island": island, "emulation": precision,
                                 "psnr_db_per_input": [round(v, 2) for v in r.per_input_psnr_db], "worst_psnr_db": round(r.psnr_db, 2)})
                    print(rows[-1], flush=True)
    write_result("fp16_island", {"inputs": "verify's inputs: points of the checkpoint's own 4-step trajectories",
                                 "timesteps_per_width": timesteps, "rows": rows}, args.output)


if __name__ == "__main__":
    main()

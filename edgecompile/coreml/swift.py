"""`--swift-resources`: the layout apple/ml-stable-diffusion's Swift pipelines load from.

Swift loads compiled models (`<Name>.mlmodelc`) from a `Resources/` folder; the SD3 pipeline's denoiser is
`MultiModalDiffusionTransformer`. Compiling (`xcrun coremlcompiler compile`) exists only on macOS, so on other
systems the folder holds the package plus the script that compiles it; on macOS it is compiled here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from edgecompile.deploy.contract import IO_DOC, LATENT, OUTPUT, TEXT, TIMESTEP

COMPILE_SCRIPT = "compile_resources.sh"
CONTRACT = "denoiser_contract.json"


def denoiser_contract(deploy) -> dict:
    c = deploy.config
    h, w = deploy.latent_hw
    shapes = {LATENT: [1, c.latent_channels, h, w], TIMESTEP: [1], TEXT: [1, c.text_dim, 1, c.text_len],
              OUTPUT: [1, c.latent_channels, h, w]}
    return {
        "model": "MultiModalDiffusionTransformer",
        "inputs": {n: {"shape": shapes[n], "dtype": "Float32", "meaning": IO_DOC[n]} for n in (LATENT, TIMESTEP, TEXT)},
        "outputs": {OUTPUT: {"shape": shapes[OUTPUT], "dtype": "Float32", "meaning": IO_DOC[OUTPUT]}},
        "differences_from_sd3": [
            "no pooled_text_embeddings input: the timestep alone drives the modulation (adaLN-single)",
            "timestep is flow time t in [0, 1], not t * 1000; the output is the rectified-flow velocity",
        ],
        "scheduler": "rectified flow, Euler: x <- x + (t_next - t) * v, t from 1 to 0",
    }


def write_swift_resources(resources: Path, package: Path, deploy) -> None:
    (resources / CONTRACT).write_text(json.dumps(denoiser_contract(deploy), indent=2) + "\n")
    script = resources / COMPILE_SCRIPT
    script.write_text(
        "#!/bin/sh\n# Compile the denoiser for the Swift pipeline (macOS, Xcode command line tools).\n"
        f'set -e\ncd "$(dirname "$0")"\nxcrun coremlcompiler compile {package.name} .\n'
    )
    script.chmod(0o755)
    if sys.platform == "darwin" and shutil.which("xcrun"):
        subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(resources)], check=True, capture_output=True)

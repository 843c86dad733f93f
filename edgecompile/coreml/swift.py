"""`--swift-resources`: the layout apple/ml-stable-diffusion's Swift pipelines load from.

Swift loads compiled models (`<Name>.mlmodelc`) from a `Resources/` folder; the SD3 pipeline's denoiser is
`MultiModalDiffusionTransformer` (`MultiModalDiffusionTransformerChunk1`, ... with --chunks, as the SD pipelines
load `UnetChunk1`, `UnetChunk2`). Compiling (`xcrun coremlcompiler compile`) exists only on macOS, so on other
systems the folder holds the package plus the script that compiles it; on macOS it is compiled here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from edgecompile.deploy.chunks import CARRY_DOC
from edgecompile.deploy.contract import LATENT, OUTPUT, TEXT, TEXT_MASK, TIMESTEP, input_names, io_doc

COMPILE_SCRIPT = "compile_resources.sh"
CONTRACT = "denoiser_contract.json"
UNCONDITIONAL = "unconditional_text_embedding.bin"  # Float32, little-endian, in the TEXT input's shape
DEFAULT_CFG_SCALE = 2.0  # the guidance the export's own samples use (coreml/generate.py SampleSettings)


def sampling_loop(c, unconditional: str | None) -> dict:
    """What an app's loop needs beyond one call: the timesteps, the solver, the initial noise, guidance with a
    batch-1 package, and how the text input is filled."""
    if c.prediction == "epsilon":
        ratio = "train_timesteps // steps"
        timesteps = (f"diffusers' 'leading' spacing: t_k = (steps - 1 - k) * ({ratio}), k = 0..steps-1, as DDPM step numbers "
                     f"({c.train_timesteps} training steps), fed to {TIMESTEP} as Float32")
        solver = ("deterministic DDIM (eta = 0, set_alpha_to_one): alphas_cumprod from linear betas "
                  f"{c.beta_start:g}..{c.beta_end:g}; x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t); x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, "
                  "with a_prev = alphas_cumprod[t - ratio], or 1 after the last step")
    else:
        timesteps = "uniform flow times t_k = 1 - k / steps, k = 0..steps: the package takes t_k, for k = 0..steps-1"
        solver = "Euler: x <- x + (t_{k+1} - t_k) * v, from t = 1 (noise) to t = 0 (data)"
    loop = {
        "steps": "4 in the paper's app (more steps: better images, linearly more time)",
        "timesteps": timesteps,
        "solver": solver,
        "initial_noise": f"standard normal N(0, 1), shape [1, {c.latent_channels}, H, W] (no extra scaling: init_noise_sigma = 1)",
        "guidance": (f"classifier-free guidance with this batch-1 package: two calls per step, one with the prompt's text embedding, "
                     f"one with the unconditional embedding; out = uncond + scale * (cond - uncond); scale {DEFAULT_CFG_SCALE:g} is what "
                     "edgecompile's own samples use (1 turns guidance off: one call per step)"),
        "unconditional_embedding": (f"{UNCONDITIONAL} in this folder: Float32 little-endian, shape [1, {c.text_dim}, 1, {c.text_len}], "
                                    f"the checkpoint's empty-prompt embedding, ready for {TEXT}" if unconditional else
                                    f"the text encoder's output for the empty prompt \"\", in {TEXT}'s layout"),
        "text": (f"{c.text_len} tokens x {c.text_dim} channels, channel-first [1, {c.text_dim}, 1, {c.text_len}]; "
                 + (f"{TEXT_MASK} [1, {c.text_len}] marks the prompt's tokens 1 and the padding 0 (the tokenizer's attention mask), "
                    "as diffusers masks them; the unconditional call uses the empty prompt's mask" if c.text_mask else
                    f"the package attends to all {c.text_len} tokens (no mask input): pad a shorter prompt as the text encoder pads it "
                    "and keep the pipeline's max_sequence_length")),
    }
    return loop


def denoiser_contract(deploy, chunks: list | None = None, functions: list | None = None, unconditional: str | None = None) -> dict:
    """The denoiser's I/O for the app; with --chunks, the packages in run order and how their tensors bind; with
    several latent sizes, the functions of the multifunction package (`functions`: [(name, deploy graph)])."""
    c = deploy.config
    h, w = deploy.latent_hw
    shapes = {LATENT: [1, c.latent_channels, h, w], TIMESTEP: [1], TEXT: [1, c.text_dim, 1, c.text_len], TEXT_MASK: [1, c.text_len],
              OUTPUT: [1, c.latent_channels, h, w]}
    doc = io_doc(c)
    if c.prediction == "epsilon":
        differences = ["no pooled_text_embeddings input: the timestep alone drives the modulation (adaLN-single)",
                       f"timestep is the DDPM step (0..{c.train_timesteps - 1}); the output is the predicted noise (epsilon)"]
        scheduler = (f"DDPM epsilon prediction, linear betas {c.beta_start:g}..{c.beta_end:g}, {c.train_timesteps} training steps: "
                     "DDIM or DPM-Solver++ as diffusers' PixArt pipelines")
    else:
        differences = ["no pooled_text_embeddings input: the timestep alone drives the modulation (adaLN-single)",
                       "timestep is flow time t in [0, 1], not t * 1000; the output is the rectified-flow velocity"]
        scheduler = "rectified flow, Euler: x <- x + (t_next - t) * v, t from 1 to 0"
    contract = {
        "model": "MultiModalDiffusionTransformer",
        "inputs": {n: {"shape": shapes[n], "dtype": "Float32", "meaning": doc[n]} for n in input_names(c)},
        "outputs": {OUTPUT: {"shape": shapes[OUTPUT], "dtype": "Float32", "meaning": doc[OUTPUT]}},
        "differences_from_sd3": differences,
        "scheduler": scheduler,
        "sampling_loop": sampling_loop(c, unconditional),
    }
    if functions:
        contract["functions"] = {
            "how_to_load": ("One function per latent size; the first is the default. Swift: set "
                            "MLModelConfiguration.functionName to the function's name before loading (iOS 18 / macOS 15); "
                            "Python: coremltools.models.MLModel(path, function_name=name). The weights are stored once."),
            "default": functions[0][0],
            "functions": [{"name": name, "latent": list(graph.latent_hw),
                           "inputs": {LATENT: [1, c.latent_channels, *graph.latent_hw]}, "outputs": {OUTPUT: [1, c.latent_channels, *graph.latent_hw]}}
                          for name, graph in functions],
        }
    if chunks:
        contract["chunks"] = {
            "how_to_run": ("One denoiser call runs every chunk in this order. Keep one dictionary of MLMultiArrays holding "
                           "the inputs above; feed each chunk the entries its inputs name, then add its outputs to the "
                           f"dictionary. The last chunk's {OUTPUT} is the denoiser output. All tensors are Float32."),
            "carried_tensors": {name: doc for name, doc in CARRY_DOC.items()} | {
                "naming": "<name>_<k>: computed by chunk k; a chunk that passes a tensor through does not output it again"},
            "models": [{"model": Path(ch.package).stem, "blocks": ch.blocks,
                        "inputs": {n: {"shape": shape, "dtype": "Float32"} for n, shape in ch.inputs.items()},
                        "outputs": {n: {"shape": shape, "dtype": "Float32"} for n, shape in ch.outputs.items()}}
                       for ch in chunks],
        }
    return contract


def write_swift_resources(resources: Path, packages: list[Path], deploy, chunks: list | None = None, functions: list | None = None,
                          unconditional=None) -> None:
    """The Resources folder's contract and compile script; `unconditional` (the checkpoint's empty-prompt embedding,
    (1, T, D)) is shipped for the app's guidance when the checkpoint has one."""
    if unconditional is not None:
        text = unconditional.detach().float().cpu().transpose(1, 2)[:, :, None].contiguous()  # (1, T, D) -> (1, D, 1, T)
        (resources / UNCONDITIONAL).write_bytes(text.numpy().astype("<f4").tobytes())
    contract = denoiser_contract(deploy, chunks, functions, UNCONDITIONAL if unconditional is not None else None)
    (resources / CONTRACT).write_text(json.dumps(contract, indent=2) + "\n")
    script = resources / COMPILE_SCRIPT
    packages = [p for p in packages if p.suffix == ".mlpackage"]  # Core AI assets are loaded as they are: nothing to compile
    if not packages:
        return
    compile_lines = "".join(f"xcrun coremlcompiler compile {p.name} .\n" for p in packages)
    script.write_text(
        "#!/bin/sh\n# Compile the denoiser for the Swift pipeline (macOS, Xcode command line tools).\n"
        f'set -e\ncd "$(dirname "$0")"\n{compile_lines}'
    )
    script.chmod(0o755)
    if sys.platform == "darwin" and shutil.which("xcrun"):
        for p in packages:
            subprocess.run(["xcrun", "coremlcompiler", "compile", str(p), str(resources)], check=True, capture_output=True)

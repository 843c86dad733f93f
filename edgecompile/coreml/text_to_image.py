"""Prompt to picture through the packages of an `export --pipeline` Resources folder, as the app runs them:

    tokenizer.json -> TextEncoder (the prompt and the empty prompt) -> the denoiser loop (classifier-free guidance
    with the empty prompt's encoding, the checkpoint's sampler) -> VAEDecoder -> RGB images in [0, 1]

Core ML runs the packages on macOS, the MIL interpreter (fp16 emulation) elsewhere. `compare` reports the
final-image PSNR against a reference from the same noise: for a checkpoint imported from a diffusers PixArt
pipeline, diffusers' own pipeline class (PixArtAlphaPipeline / PixArtSigmaPipeline) on the same components, its
scheduler the one pipeline.json names; otherwise the same loop in torch on the checkpoint's own modules
(transformers' text encoder, the reference denoiser, diffusers' VAE).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgecompile.coreml.generate import PackageDenoiser
from edgecompile.coreml.package import PackageView, load_package
from edgecompile.coreml.verify import package_runner
from edgecompile.deploy.contract import TEXT, text_from_package
from edgecompile.errors import EdgeCompileError
from edgecompile.metrics import psnr_db
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.sampling import sample

MANIFEST = "pipeline.json"
MAX_PROMPTS = 64


@dataclass
class PipelinePackages:
    resources: Path
    manifest: dict
    text_encoder: PackageView  # the first of text_encoder_chunks
    denoiser: PackageView
    decoder: PackageView
    tokenizer: Path
    text_encoder_chunks: list[PackageView] = field(default_factory=list)  # the text encoder's packages in run order


def load_pipeline(resources: str | Path) -> PipelinePackages:
    """A Resources folder written by `export --pipeline`, its manifest and packages read and checked."""
    resources = Path(resources)
    path = resources / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeCompileError(f"{path} cannot be read ({str(e).splitlines()[0]}): pass the Resources folder `export --pipeline` wrote") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "edgecompile-pipeline":
        raise EdgeCompileError(f"{path} is not an edgecompile pipeline manifest: pass the Resources folder `export --pipeline` wrote")
    comps = manifest.get("components") or {}
    try:
        files = {k: resources / comps[k]["package"] for k in ("text_encoder", "denoiser", "decoder")}
        tokenizer = resources / comps["tokenizer"]["file"]
    except (KeyError, TypeError):
        raise EdgeCompileError(f"{path} does not name every component (text_encoder, denoiser, decoder, tokenizer): re-export it") from None
    for name, f in {**files, "tokenizer": tokenizer}.items():
        if f.name != Path(f.name).name or f.parent != resources or not f.exists():
            raise EdgeCompileError(f"{path}: the {name} ({f.name}) is missing beside it: keep the Resources folder whole")
    chunk_names = comps["text_encoder"].get("chunks") or [files["text_encoder"].name]
    if not isinstance(chunk_names, list) or not all(isinstance(n, str) and n == Path(n).name and (resources / n).exists() for n in chunk_names):
        raise EdgeCompileError(f"{path}: the text encoder's chunks {chunk_names!r} are not all beside it: keep the Resources folder whole")
    chunks = [load_package(resources / n) for n in chunk_names]
    return PipelinePackages(resources=resources, manifest=manifest, text_encoder=chunks[0], text_encoder_chunks=chunks,
                            denoiser=load_package(files["denoiser"]), decoder=load_package(files["decoder"]), tokenizer=tokenizer)


def tokenize(tokenizer: Path, prompts: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (N, T) int32: padded or cut to the text length, as the pipeline pads."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    pad = tok.token_to_id("<pad>") or 0
    ids, masks = [], []
    for p in prompts:
        row = tok.encode(p).ids[:text_len]
        masks.append([1] * len(row) + [0] * (text_len - len(row)))
        ids.append(row + [pad] * (text_len - len(row)))
    return np.array(ids, np.int32), np.array(masks, np.int32)


@dataclass
class TextToImageResult:
    images: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    reference: np.ndarray | None  # the reference pipeline's, from the same noise (compare)
    prompts: list[str]
    steps: int
    cfg_scale: float
    runtime: str
    seconds: float
    reference_name: str | None = None  # what computed `reference`

    @property
    def psnr_db(self) -> float | None:
        return None if self.reference is None else psnr_db(self.reference, self.images)

    def summary(self) -> dict:
        p = self.psnr_db
        return {"prompts": self.prompts, "steps": self.steps, "cfg_scale": self.cfg_scale, "runtime": self.runtime,
                "images": list(self.images.shape), "final_image_psnr_db": None if p is None or not math.isfinite(p) else round(p, 2),
                "reference": self.reference_name,
                "non_finite_images": int((~np.isfinite(self.images)).any(axis=(1, 2, 3)).sum()), "seconds": round(self.seconds, 2)}


def noise_for(config, n: int, latent_hw: tuple[int, int], seed: int, noise_file: Path | None) -> torch.Tensor:
    """The initial latents: N(0, 1) from `seed`, or the (N, C, H, W) `noise` tensor of a safetensors file."""
    shape = (n, config.latent_channels, *latent_hw)
    if noise_file is None:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(noise_file), framework="pt") as f:
            noise = f.get_tensor("noise").float()
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise EdgeCompileError(f"--noise {noise_file}: not a safetensors file with a 'noise' tensor ({str(e).splitlines()[0]})") from None
    if tuple(noise.shape) != shape or not torch.isfinite(noise).all():
        raise EdgeCompileError(f"--noise {noise_file}: 'noise' is {tuple(noise.shape)}, expected {shape} of finite values "
                               "(prompts x per-prompt, latent channels, latent H, W)")
    return noise


def text_to_image(pipe: PipelinePackages, ckpt: Checkpoint, prompts: list[str], steps: int = 4, cfg_scale: float = 2.0, seed: int = 0,
                  noise_file: Path | None = None, compare: bool = False, runtime: str = "auto") -> TextToImageResult:
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise EdgeCompileError(f"give 1..{MAX_PROMPTS} prompts (--prompt TEXT, repeated), not {len(prompts)}")
    config = ckpt.config
    start = time.perf_counter()
    # the interpreter's faithful fp16 emulation; Core ML computes as the device does, Core AI's assets in their own fp32
    chain = pipe.text_encoder_chunks or [pipe.text_encoder]
    encoders = [package_runner(v, "fp32" if v.is_aimodel else "fp16", runtime)[0] for v in chain]
    run_decoder, label = package_runner(pipe.decoder, "fp32" if pipe.decoder.is_aimodel else "fp16", runtime)
    ids, masks = tokenize(pipe.tokenizer, [*prompts, ""], config.text_len)  # the empty prompt: the unconditional text
    wants_mask = any(f["name"] == "attention_mask" for f in pipe.text_encoder.inputs)

    def encode(i: int) -> np.ndarray:
        values = {"input_ids": ids[i : i + 1], **({"attention_mask": masks[i : i + 1]} if wants_mask else {})}
        for view, run in zip(chain, encoders):  # one package, or the chunks in order, each fed by name
            values.update(run({f["name"]: values[f["name"]] for f in view.inputs}))
        return np.asarray(values[TEXT], np.float32)  # (1, D, 1, T)

    text = torch.cat([text_from_package(torch.from_numpy(encode(i))) for i in range(len(prompts) + 1)])  # (N + 1, T, D)
    cond, null = text[:-1], text[-1:]
    mask_t = torch.from_numpy(masks).float()
    hw = pipe.denoiser.latent_hw
    noise = noise_for(config, len(prompts), hw, seed, noise_file)
    latents = sample(config, PackageDenoiser(pipe.denoiser, precision="auto", runtime=runtime), noise, cond, steps, cfg_scale, null,
                     masks=(mask_t[:-1], mask_t[-1:]) if config.text_mask else None)
    images = np.concatenate([np.asarray(run_decoder({"z": latents[i : i + 1].numpy()})["image"], np.float32) for i in range(len(prompts))])
    images = np.clip((images + 1) / 2, 0, 1).transpose(0, 2, 3, 1)  # (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) in [0, 1]
    reference, reference_name = None, None
    if compare and (ckpt.provenance.get("import") or {}).get("pipeline_class"):
        reference_name = f"diffusers' {ckpt.provenance['import']['pipeline_class']}"
        reference = diffusers_pipeline(ckpt, pipe, prompts, noise, steps, cfg_scale)
    elif compare:
        reference_name = "the torch pipeline"
        reference = torch_pipeline(ckpt, pipe, ids, masks, noise, steps, cfg_scale)
    return TextToImageResult(images=images, reference=reference, prompts=list(prompts), steps=steps, cfg_scale=cfg_scale,
                             runtime=label, seconds=time.perf_counter() - start, reference_name=reference_name)


@torch.no_grad()
def diffusers_pipeline(ckpt: Checkpoint, pipe: PipelinePackages, prompts: list[str], noise: torch.Tensor, steps: int,
                       cfg_scale: float) -> np.ndarray:
    """diffusers' own PixArt pipeline on the checkpoint's components (its transformer mapped back from the reference
    model, model/importers/pixart.to_diffusers), its scheduler the one the packages' loop runs, from the same noise."""
    import diffusers
    import transformers

    from edgecompile.model.components import load_parts
    from edgecompile.model.importers.pixart import to_diffusers

    imported = ckpt.provenance["import"]
    cls = getattr(diffusers, str(imported["pipeline_class"]), None)
    if cls is None or not str(imported["pipeline_class"]).startswith("PixArt") or "transformer_config" not in imported:
        raise EdgeCompileError(f"--compare: {imported['pipeline_class']!r} is not a diffusers PixArt pipeline this edgecompile runs "
                               "(re-import the checkpoint, or compare without it)")
    scheduler = pipe.manifest["scheduler"]
    if scheduler.get("class") != "DDIMScheduler":
        raise EdgeCompileError(f"--compare: pipeline.json names {scheduler.get('class')}, which diffusers' PixArt pipelines do not run here")
    parts = load_parts(ckpt.components, ckpt.config.text_dim, str(ckpt.path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(ckpt.components["tokenizer"]), local_files_only=True)
    runner = cls(tokenizer=tokenizer, text_encoder=parts.text_encoder, vae=parts.vae, transformer=to_diffusers(ckpt.model, imported["transformer_config"]),
                 scheduler=diffusers.DDIMScheduler(**scheduler["config"]))
    runner.set_progress_bar_config(disable=True)
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    out = runner(prompt=list(prompts), negative_prompt="", num_inference_steps=steps, guidance_scale=cfg_scale, latents=noise.clone(),
                 height=noise.shape[-2] * factor, width=noise.shape[-1] * factor, output_type="np", clean_caption=False,
                 use_resolution_binning=False, max_sequence_length=ckpt.config.text_len)
    return np.asarray(out.images, np.float32)  # (N, H, W, 3) in [0, 1]


@torch.no_grad()
def torch_pipeline(ckpt: Checkpoint, pipe: PipelinePackages, ids: np.ndarray, masks: np.ndarray, noise: torch.Tensor, steps: int,
                   cfg_scale: float) -> np.ndarray:
    """The same loop on the checkpoint's own modules, fp32: transformers' text encoder, the reference denoiser at the
    package's width, diffusers' VAE (the reference the packages must equal)."""
    from edgecompile.model.components import load_parts
    from edgecompile.model.elastic import extract_width

    parts = load_parts(ckpt.components, ckpt.config.text_dim, str(ckpt.path))
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(masks).long()
    kwargs = {"attention_mask": mask_t} if type(parts.text_encoder).__name__ == "T5EncoderModel" else {}
    text = parts.text_encoder(input_ids=ids_t, **kwargs).last_hidden_state.float()
    cond, null = text[:-1], text[-1:]
    model = extract_width(ckpt.model, pipe.denoiser.width, share=True).eval()
    if ckpt.config.text_mask:
        latents = sample(ckpt.config, lambda x, t, c, m: model(x, t, c, text_mask=m), noise, cond, steps, cfg_scale, null,
                         masks=(mask_t[:-1].float(), mask_t[-1:].float()))
    else:
        latents = sample(ckpt.config, model, noise, cond, steps, cfg_scale, null)
    scale = pipe.manifest["components"]["decoder"]["latent_scaling_factor"]
    shift = pipe.manifest["components"]["decoder"]["latent_shift_factor"]
    images = parts.vae.decode(latents / scale + shift).sample.numpy()
    return np.clip((images + 1) / 2, 0, 1).transpose(0, 2, 3, 1)


def save_images(images: np.ndarray, prompts: list[str], path: Path, title: str) -> None:
    """A PNG grid with each prompt over its image (-o NAME.png), or the array itself (-o NAME.npy: (N, H, W, 3) float32)."""
    if path.suffix.lower() == ".npy":
        with open(path, "wb") as f:
            np.save(f, images.astype(np.float32))
        return
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 2.2 * n), 2.8), squeeze=False)
    for i, (ax, img) in enumerate(zip(axes[0], images)):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("\n".join(textwrap.wrap(prompts[i], 24)), fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, int(max(4.0, 2.2 * n) * 12))), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)

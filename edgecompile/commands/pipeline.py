"""`export --pipeline`: the rest of the text-to-image pipeline beside each width's denoiser, in the Resources layout
the Swift pipelines load:

    Resources/
      TextEncoder.mlpackage                 input_ids [, attention_mask] -> token_level_text_embeddings (the denoiser's input)
      MultiModalDiffusionTransformer.mlpackage   the denoiser (the export's own)
      VAEDecoder.mlpackage                  z (the denoiser's final latent) -> image in [-1, 1], latent scaling inside
      VAEEncoder.mlpackage                  (--img2img) image in [-1, 1] -> z as the denoiser takes it (the posterior mean)
      tokenizer.json                        the fast tokenizer (Hugging Face tokenizers format)
      pipeline.json                         the manifest: components, their I/O, scheduler, steps, guidance, text length

The text encoder and decoder do not depend on the width: they are converted and verified once per export
(`compile_components`) and written into every width's folder (`write_components`). Each is verified against its
fp32 torch graph in the fp16 emulation, with the fp16 overflow it was found to have and what fixed it
(coreml/component.py); the text encoder's torch graph against transformers' module is checked by the tests.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgecompile.compress.palettize_model import palettize_deploy, uniform_bits
from edgecompile.choices import Format
from edgecompile.coreml.component import ComponentResult, convert_for_core_ai, convert_with_islands
from edgecompile.coreml.package import record_weight_digests
from edgecompile.deploy.contract import OUTPUT, TEXT, input_names
from edgecompile.deploy.metadata import component_metadata
from edgecompile.deploy.text_encoder import (ATTENTION_MASK, HIDDEN, INPUT_IDS, T5EncoderANE, calibrate_scales, split_text_encoder,
                                             text_encoder_chunk_count, text_encoder_graph)
from edgecompile.deploy.vae import VAEDecoderGraph, VAEEncoderGraph
from edgecompile.errors import VerificationFailed
from edgecompile.metrics import psnr_db
from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.components import load_parts

TEXT_ENCODER, DECODER, ENCODER = "TextEncoder", "VAEDecoder", "VAEEncoder"  # apple/ml-stable-diffusion's resource names
TOKENIZER_FILE = "tokenizer.json"
MANIFEST = "pipeline.json"
CALIBRATION_PROMPTS = ("", "a photo of a cat", "a handwritten seven", "a red fox in the snow, highly detailed, 4k",
                       "an astronaut riding a horse on the moon")
CALIBRATION_LATENTS = 3
DEFAULT_TEXT_ENCODER_BITS = 8


@dataclass
class CompiledComponent:
    kind: str  # text_encoder, decoder, encoder
    package: str  # its file name in Resources/
    model: object  # the in-memory Core ML model, saved into each width's folder
    result: ComponentResult
    source_class: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    info: dict = field(default_factory=dict)
    seconds: float = 0.0

    def report(self) -> dict:
        return {"kind": self.kind, "package": self.package, "source_class": self.source_class, "inputs": self.inputs,
                "outputs": self.outputs, **self.info, "seconds": round(self.seconds, 2), "verify": self.result.to_dict()}


def token_ids(tokenizer: Path, texts, text_len: int, with_mask: bool) -> list[tuple[torch.Tensor, ...]]:
    """The calibration prompts tokenized as the app tokenizes them: padded (or cut) to the text length."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    pad_id = tok.token_to_id("<pad>") or 0
    out = []
    for text in texts:
        ids = tok.encode(text).ids[:text_len]
        mask = [1] * len(ids) + [0] * (text_len - len(ids))
        ids = ids + [pad_id] * (text_len - len(ids))
        row = (torch.tensor([ids], dtype=torch.int32),)
        out.append(row + (torch.tensor([mask], dtype=torch.int32),) if with_mask else row)
    return out


def unquantized_psnr(reference: torch.nn.Module, simulation: torch.nn.Module, inputs) -> float:
    """The worst PSNR of the palettized simulation's first output against the unquantized graph's."""
    worst = float("inf")
    with torch.no_grad():
        for args in inputs:
            want, got = reference(*args), simulation(*args)
            want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
            worst = min(worst, psnr_db(want.numpy(), got.numpy()))
    return worst


def compile_components(ckpt: Checkpoint, target: str, latent_hw: tuple[int, int], on_stage=None,
                       text_encoder_bits: int = DEFAULT_TEXT_ENCODER_BITS, img2img: bool = False,
                       fmt: Format = Format.COREML, text_encoder_chunks: int | None = None) -> list[CompiledComponent]:
    """The checkpoint's text encoder and VAE decoder (and with `img2img` its VAE encoder) converted, fp16 overflow
    fixed, and verified (raises VerificationFailed below the bar: nothing unverified ships). Core AI assets
    (`fmt` aimodel) compute in fp32 and are verified by Core AI's runtime. A text encoder whose weights pass the
    Neural Engine's 2 GiB file limit at its bits (T5-XXL) is cut into chunks (`text_encoder_chunks`, default: as
    many as the limit needs), each verified alone and the chain end to end."""

    def convert(graph, kind, inputs, palettes=None):
        if fmt is Format.AIMODEL:
            return convert_for_core_ai(graph, kind, inputs, palettes=palettes)
        return convert_with_islands(graph, kind, inputs, target, palettes=palettes)

    parts = load_parts(ckpt.components, ckpt.config.text_dim, str(ckpt.path))
    compiled = []
    if on_stage:
        on_stage("text encoder")
    start = time.perf_counter()
    encoder = text_encoder_graph(parts.text_encoder, ckpt.config.text_len)
    t5 = isinstance(encoder, T5EncoderANE)
    prompts = token_ids(parts.tokenizer, CALIBRATION_PROMPTS, ckpt.config.text_len, with_mask=t5)
    scales = calibrate_scales(encoder, prompts) if t5 else {}
    palettes, simulation = None, encoder
    if text_encoder_bits != 16:  # 8-bit LUTs by default: a text encoder runs twice per image, its weights dominate a small app
        simulation = copy.deepcopy(encoder)
        palettes = palettize_deploy(simulation, uniform_bits(simulation, text_encoder_bits)) or None  # none: every layer too small
        simulation = simulation if palettes else encoder
    n_chunks = text_encoder_chunks or text_encoder_chunk_count(encoder, text_encoder_bits)
    ins = {INPUT_IDS: [1, ckpt.config.text_len], **({ATTENTION_MASK: [1, ckpt.config.text_len]} if t5 else {})}
    outs = {n: s for n, s in ((TEXT, [1, ckpt.config.text_dim, 1, ckpt.config.text_len]),) if n in encoder.output_names}
    info = {"rms_norm_scales": scales} if scales else {}
    if n_chunks == 1:
        ml, result = convert(simulation, "text_encoder", prompts, palettes=palettes)
        if palettes:
            result.bits = text_encoder_bits
            result.psnr_vs_unquantized_db = unquantized_psnr(encoder, simulation, prompts)
        compiled.append(CompiledComponent("text_encoder", TEXT_ENCODER + fmt.suffix, ml, result, type(parts.text_encoder).__name__, ins, outs,
                                          info=info, seconds=time.perf_counter() - start))
    else:
        compiled += text_encoder_chunks_compiled(encoder, simulation, palettes, prompts, n_chunks, convert, fmt, ins, outs, info,
                                                 type(parts.text_encoder).__name__, text_encoder_bits, start)
    if on_stage:
        on_stage("decoder")
    start = time.perf_counter()
    decoder = VAEDecoderGraph(parts.vae, latent_hw)
    g = torch.Generator().manual_seed(7)
    latents = [(torch.randn(1, decoder.channels, *latent_hw, generator=g),) for _ in range(CALIBRATION_LATENTS)]
    ml, result = convert(decoder, "decoder", latents)
    with torch.no_grad():
        image_hw = list(decoder(*latents[0]).shape[2:])
    compiled.append(CompiledComponent("decoder", DECODER + fmt.suffix, ml, result, type(parts.vae).__name__,
                                      {"z": [1, decoder.channels, *latent_hw]}, {"image": [1, 3, *image_hw]},
                                      info={"latent_scaling_factor": decoder.scale, "latent_shift_factor": decoder.shift,
                                            "scaling": "inside the package: feed the denoiser's final latent as it is"},
                                      seconds=time.perf_counter() - start))
    if img2img:
        if on_stage:
            on_stage("encoder")
        start = time.perf_counter()
        encoder_graph = VAEEncoderGraph(parts.vae, tuple(image_hw))
        images = [(torch.rand(1, 3, *image_hw, generator=g) * 2 - 1,) for _ in range(CALIBRATION_LATENTS)]
        ml, result = convert(encoder_graph, "encoder", images)
        compiled.append(CompiledComponent("encoder", ENCODER + fmt.suffix, ml, result, type(parts.vae).__name__,
                                          {"image": [1, 3, *image_hw]}, {"z": [1, decoder.channels, *latent_hw]},
                                          info={"latent_scaling_factor": encoder_graph.scale, "latent_shift_factor": encoder_graph.shift,
                                                "scaling": "inside the package: z is what the denoiser takes (the posterior mean)"},
                                          seconds=time.perf_counter() - start))
    for c in compiled:
        if not c.result.passed:
            raise VerificationFailed(f"{c.kind}: verification failed: {c.result.problem}; nothing was written")
    return compiled


def text_encoder_chunks_compiled(encoder, simulation, palettes, prompts, n: int, convert, fmt: Format, ins: dict, outs: dict, info: dict,
                                 source_class: str, bits: int, start: float) -> list[CompiledComponent]:
    """The text encoder as N chunk packages (TextEncoderChunk1, ...), each converted and verified on the hidden states
    the torch chunks before it hand over; then the chain of packages end to end against the whole graph."""
    chunks = split_text_encoder(simulation, n)
    feeds: list[list[tuple]] = [[] for _ in chunks]
    with torch.no_grad():
        for ids, mask in prompts:
            x = ids
            for k, chunk in enumerate(chunks):
                feeds[k].append((x, mask))
                x = chunk(x, mask)
    names = [f"{TEXT_ENCODER}Chunk{k}{fmt.suffix}" for k in range(1, n + 1)]
    compiled = []
    hidden = [1, simulation.blocks[0].q.in_channels, 1, ins[INPUT_IDS][1]]
    for k, (chunk, name) in enumerate(zip(chunks, names), start=1):
        own = {layer: p for layer, p in (palettes or {}).items() if chunk.owns(layer)} or None
        ml, result = convert(chunk, f"text_encoder chunk {k}/{n}", feeds[k - 1], palettes=own)
        if own:
            result.bits = bits
        chunk_ins = {chunk.input_names[0]: ins[INPUT_IDS] if chunk.first else hidden, ATTENTION_MASK: ins[ATTENTION_MASK]}
        chunk_outs = outs if chunk.last else {HIDDEN: hidden}
        compiled.append(CompiledComponent("text_encoder", name, ml, result, source_class, chunk_ins, chunk_outs,
                                          info={**info, "chunk": [k, n], "chunk_packages": names, "blocks": list(chunk.index_range)},
                                          seconds=time.perf_counter() - start))
    if palettes:
        compiled[0].result.psnr_vs_unquantized_db = unquantized_psnr(encoder, simulation, prompts)
    return compiled


def write_components(compiled: list[CompiledComponent], resources: Path, ckpt: Checkpoint, checkpoint_sha256: str | None,
                     denoiser: Path, steps: int = 4, cfg_scale: float = 2.0) -> list[dict]:
    """Save the components into `resources` beside the denoiser, copy the tokenizer, write pipeline.json; returns
    the components' reports."""
    for c in compiled:
        path = resources / c.package
        c.model.user_defined_metadata.update(component_metadata(c.kind, checkpoint_sha256, {"source_class": c.source_class, **c.info}))
        c.model.save(str(path))
        if path.suffix == Format.COREML.suffix:  # a Core AI asset records its program's digest as it is saved
            record_weight_digests(path)
    shutil.copyfile(ckpt.components["tokenizer"] / TOKENIZER_FILE, resources / TOKENIZER_FILE)
    (resources / MANIFEST).write_text(json.dumps(manifest(compiled, ckpt, denoiser, steps, cfg_scale), indent=2) + "\n")
    return [c.report() for c in compiled]


def manifest(compiled: list[CompiledComponent], ckpt: Checkpoint, denoiser: Path, steps: int, cfg_scale: float) -> dict:
    c = ckpt.config
    by_kind = {x.kind: x for x in compiled}
    scheduler = (ckpt.provenance.get("import") or {}).get("scheduler")
    if c.prediction == "epsilon":
        sampler = {"class": "DDIMScheduler", "config": {"num_train_timesteps": c.train_timesteps, "beta_start": c.beta_start,
                                                        "beta_end": c.beta_end, "beta_schedule": "linear", "prediction_type": "epsilon",
                                                        "timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": True}}
    else:
        sampler = {"class": "FlowMatchEulerDiscreteScheduler", "config": {"shift": 1.0, "num_train_timesteps": 1}}
    text_chunks = [x for x in compiled if x.kind == "text_encoder"]
    te, dec = text_chunks[0], by_kind["decoder"]
    return {
        "format": "edgecompile-pipeline", "format_version": 1,
        "components": {
            "tokenizer": {"file": TOKENIZER_FILE, "pad_to": c.text_len},
            "text_encoder": {"package": te.package, "class": te.source_class, "inputs": te.inputs, "outputs": text_chunks[-1].outputs,
                             **({"chunks": [x.package for x in text_chunks],
                                 "chunk_io": "each chunk takes the attention_mask; chunk k > 1 takes the previous one's "
                                             "text_encoder_hidden_states; the last returns token_level_text_embeddings"}
                                if len(text_chunks) > 1 else {})},
            "denoiser": {"package": denoiser.name, "inputs": input_names(c), "outputs": [OUTPUT]},
            "decoder": {"package": dec.package, "class": dec.source_class, "inputs": dec.inputs, "outputs": dec.outputs,
                        "image_range": [-1, 1], "latent_scaling_factor": dec.info["latent_scaling_factor"],
                        "latent_shift_factor": dec.info["latent_shift_factor"], "scaling": dec.info["scaling"]},
            **({"encoder": {"package": by_kind["encoder"].package, "class": by_kind["encoder"].source_class,
                            "inputs": by_kind["encoder"].inputs, "outputs": by_kind["encoder"].outputs, "image_range": [-1, 1],
                            "use": "image-to-image: encode, noise to the strength's timestep, denoise from there"}}
               if "encoder" in by_kind else {}),
        },
        "scheduler": sampler, "source_scheduler": scheduler,
        "steps": steps, "guidance_scale": cfg_scale, "text_length": c.text_len,
        "classifier_free_guidance": ("encode the empty prompt \"\" once with the text encoder: it is the unconditional text; each "
                                     "step calls the denoiser with the prompt's and the empty prompt's encodings and combines "
                                     "uncond + guidance_scale * (cond - uncond)"),
        "loop": "tokenize -> text encoder (prompt and empty prompt) -> denoiser loop from N(0, 1) noise -> decoder -> image (x + 1) / 2",
    }

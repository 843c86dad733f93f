"""Execute a saved package and compare it with the fp32 torch reference of its checkpoint and width.

On macOS Core ML runs the package; everywhere else (and on request) the numpy MIL interpreter does; an ONNX
export runs in onnxruntime. Verification is a gate: below `min_psnr_db` (DEFAULT_MIN_PSNR_DB unless the user
sets --min-psnr), or with any non-finite output, the result fails and `check_passed` raises.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgecompile.compress.calibration import build_calibration
from edgecompile.coreml.interpreter import MILInterpreter
from edgecompile.coreml.package import PackageView, changed_weight_files, load_chain
from edgecompile.coremltools_loader import import_coremltools
from edgecompile.deploy.chunks import chunk_example, split_deploy
from edgecompile.deploy.contract import LATENT, OUTPUT, TEXT, TEXT_MASK, TIMESTEP, input_names, text_from_package, text_to_package
from edgecompile.deploy.dit import DeployDiT
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.digest import sha256_file
from edgecompile.errors import EdgeCompileError, VerificationFailed
from edgecompile.jsonutil import finite_or_none
from edgecompile.metrics import psnr_db
from edgecompile.model.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from edgecompile.model.config import ModelConfig
from edgecompile.model.elastic import extract_width

N_VERIFY_INPUTS = 3  # three timesteps spread over the trajectory
DEFAULT_MIN_PSNR_DB = 60.0  # against edgecompile's own simulation (ml-ane-transformers asks > 60 dB of a BERT)


@dataclass
class GenerationSummary:
    """What a generation run measured (report.json's `generation`, `sample --json`): no pictures."""

    runtime: str
    steps: int
    cfg_scale: float
    seed: int
    labels: list[str]  # the prompt of each sample
    psnr_db: float | None  # final samples, package vs checkpoint from the same noise, all samples as one signal
    worst_sample_psnr_db: float | None
    package_accuracy: float | None  # digits model: the package's samples classified as their prompt
    checkpoint_accuracy: float | None
    non_finite_samples: int
    seconds: float
    grid: str | None = None  # the PNG written beside the package, relative to the width's folder

    def to_dict(self) -> dict:
        return finite_or_none(dict(self.__dict__))

    @classmethod
    def from_dict(cls, data: dict) -> GenerationSummary:
        return cls(**data)


@dataclass
class VerifyResult:
    package: str
    runtime: str
    precision: str
    width: float
    psnr_db: float  # the worst input; NaN when any output was non-finite
    psnr_vs_checkpoint_db: float
    per_input_psnr_db: list[float] = field(default_factory=list)
    reference: str = "fp32 torch reference of the checkpoint"
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    non_finite_outputs: int = 0
    chunk_psnr_db: list[float] = field(default_factory=list)  # --chunks: each chunk alone, fed the reference's tensors
    generation: GenerationSummary | None = None  # --generate: the app's sampling loop through the package
    function: str | None = None  # the function verified, of a multifunction package
    changed_weight_files: list[str] = field(default_factory=list)  # weight files whose SHA-256 differs from the recorded one
    # where verification's time went (wall seconds): running the package (the chain), the torch references of the
    # whole model, and the chunks alone (their references and packages); the rest is reading the package and the
    # checkpoint. The first two are its floor on a machine: what target 1 of issue 29 compares with conversion.
    package_seconds: float = 0.0
    reference_seconds: float = 0.0
    chunks_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (not self.changed_weight_files and self.non_finite_outputs == 0 and math.isfinite(self.psnr_db) and self.psnr_db >= self.min_psnr_db
                and all(math.isfinite(v) and v >= self.min_psnr_db for v in self.chunk_psnr_db)
                and (self.generation is None or self.generation.non_finite_samples == 0))

    @property
    def problem(self) -> str | None:
        if self.changed_weight_files:
            return (f"the package was changed after export: {'; '.join(self.changed_weight_files)} (re-export it, or restore "
                    "the original files)")
        if self.non_finite_outputs:
            return f"{self.non_finite_outputs} of {len(self.per_input_psnr_db)} outputs hold NaN or infinite values"
        if not (math.isfinite(self.psnr_db) and self.psnr_db >= self.min_psnr_db):
            return f"PSNR {self.psnr_db:.1f} dB against {self.reference} is below the {self.min_psnr_db:g} dB bar"
        for k, v in enumerate(self.chunk_psnr_db, start=1):
            if not (math.isfinite(v) and v >= self.min_psnr_db):
                return f"chunk {k} alone: PSNR {v:.1f} dB against {self.reference} is below the {self.min_psnr_db:g} dB bar"
        if self.generation is not None and self.generation.non_finite_samples:
            return f"{self.generation.non_finite_samples} of {len(self.generation.labels)} samples drawn through the package hold NaN or infinite values"
        return None

    def to_dict(self) -> dict:
        d = {**self.__dict__, "passed": self.passed, "problem": self.problem}
        if self.generation is None:
            d.pop("generation")
        else:
            d["generation"] = self.generation.to_dict()
        return finite_or_none(d)

    @classmethod
    def from_dict(cls, data: dict) -> VerifyResult:
        nan = float("nan")  # to_dict writes a non-finite PSNR as null
        fields = {k: v for k, v in data.items() if k not in ("passed", "problem")}
        for key in ("psnr_db", "psnr_vs_checkpoint_db"):
            fields[key] = nan if fields.get(key) is None else fields[key]
        for key in ("per_input_psnr_db", "chunk_psnr_db"):
            fields[key] = [nan if v is None else v for v in fields.get(key, [])]
        if fields.get("generation") is not None:
            fields["generation"] = GenerationSummary.from_dict(fields["generation"])
        return cls(**fields)


def check_min_psnr(min_psnr_db: float) -> None:
    if not math.isfinite(min_psnr_db):
        raise EdgeCompileError(f"--min-psnr {min_psnr_db} is not a finite number of dB (e.g. --min-psnr 60)")


def check_verifiable(view: PackageView, min_psnr_db: float) -> None:
    """A bar that is a number, and a package that carries what verification rebuilds its reference from."""
    check_min_psnr(min_psnr_db)
    view.require_meta("verify")


def check_passed(result: VerifyResult, what: str = "") -> None:
    if not result.passed:
        raise VerificationFailed(f"{what or result.package}: verification failed: {result.problem}")


def worst(values: list[float]) -> float:
    return float("nan") if any(math.isnan(v) for v in values) else min(values)


def verification_inputs(config: ModelConfig, latent_hw: tuple[int, int], n: int = N_VERIFY_INPUTS, seed: int = 1234,
                        ckpt: Checkpoint | None = None, width: float | None = None):
    """Deterministic (latent, t, text) triples in package layout; text is (1, text_dim, 1, T).

    With a checkpoint that ships prompts, the inputs are what the app feeds: points of the unquantized model's own
    4-step trajectories (seed `seed`, not the calibration seed), so the PSNR against the checkpoint is measured
    where the package will run. Otherwise random latents and text at t = 0.15 .. 0.85 of the timestep range."""
    if ckpt is not None and ckpt.prompts is not None and width is not None:
        tokens = ckpt.prompts.tokens[torch.linspace(0, len(ckpt.prompts.tokens) - 1, n).round().long()]
        calib = build_calibration(ckpt.model, width, tokens, ckpt.prompts.null, latent_hw, (4,), seed).subset(n)
        return [(calib.latent[i : i + 1], calib.timestep[i : i + 1], text_to_package(calib.text[i : i + 1]))
                for i in range(len(calib))]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        latent = torch.randn((1, config.latent_channels, *latent_hw), generator=g)
        t = torch.tensor([0.15 + 0.7 * i / max(n - 1, 1)]) * config.max_timestep
        text = torch.randn((1, config.text_dim, 1, config.text_len), generator=g)
        out.append((latent, t, text))
    return out


def checkpoint_for(view: PackageView, checkpoint: str | Path | None) -> Checkpoint:
    """Load the checkpoint a package came from; refuse a different one (by content hash)."""
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    want = view.require_meta("this command").checkpoint_sha256
    ckpt = load_checkpoint(path, width=view.width)  # only what the package's width reads
    if want:
        have = sha256_file(path / "model.safetensors")
        if have != want:
            hint = "pass --checkpoint with the folder it was exported from" if checkpoint is None else "is this the checkpoint it was exported from?"
            raise EdgeCompileError(f"package {view.path} was exported from another checkpoint than {path} (weights hash differs): {hint}")
    if ModelConfig.from_dict(view.config, source=f"package {view.path}").to_dict() != ckpt.config.to_dict():  # defaults filled
        raise EdgeCompileError(f"package {view.path} records another model config than checkpoint {path} holds: "
                               "its metadata was edited, or it comes from another checkpoint; re-export it")
    return ckpt


def coreml_runner(view: PackageView) -> Callable | None:
    """Core ML prediction where it exists (macOS); None elsewhere. Returns all outputs by name."""
    if sys.platform != "darwin":
        return None
    ct = import_coremltools()
    function = {"function_name": view.function} if view.functions else {}
    ml = ct.models.MLModel(str(view.path), compute_units=ct.ComputeUnit.CPU_AND_NE, **function)
    return ml.predict


def onnx_runner(view: PackageView) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # deterministic reductions, and verification inputs are single images
    session = ort.InferenceSession(str(view.path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: {OUTPUT: session.run([OUTPUT], feeds)[0]}


def package_runner(view: PackageView, precision: str = "fp32", runtime: str = "auto") -> tuple[Callable[[dict], dict], str]:
    """A callable feeds -> outputs (by name) for one package, and what runs it."""
    if view.is_aimodel:
        if runtime not in ("auto", "coreai") or precision != "fp32":
            raise EdgeCompileError("an .aimodel runs in Core AI's runtime at its own precision: drop --runtime and --precision fp16")
        from edgecompile.coreai.runtime import AIModelRunner

        return AIModelRunner(view.path, view.function), "coreai-runtime"
    if runtime == "coreai":
        raise EdgeCompileError("--runtime coreai runs .aimodel assets: pass the .aimodel (export --format aimodel), or drop --runtime coreai")
    if view.is_onnx:
        if runtime == "coreml" or precision != "fp32":
            raise EdgeCompileError("an ONNX export runs in onnxruntime at its own precision: drop --runtime coreml and --precision fp16")
        return onnx_runner(view), "onnxruntime (cpu)"
    runner = coreml_runner(view) if runtime in ("auto", "coreml") else None
    if runtime == "coreml" and runner is None:
        raise EdgeCompileError("--runtime coreml needs macOS (Core ML is not available on this platform): use --runtime interpreter")
    if runner is not None and precision == "fp32":
        return runner, "coreml"
    return MILInterpreter(view.program, precision=precision, function=view.function).run, f"mil-interpreter ({precision})"


def package_feeds(latent: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    feeds = {LATENT: latent.numpy(), TIMESTEP: t.numpy(), TEXT: text.numpy()}
    if mask is not None:
        feeds[TEXT_MASK] = mask.float().numpy()
    return feeds


def verification_masks(config: ModelConfig, n: int) -> list[torch.Tensor | None]:
    """The text masks of the verification inputs (configs with text_mask): the first attends to every token, the
    others to the first half and the first third (prompts shorter than the text length, padded)."""
    if not config.text_mask:
        return [None] * n
    masks = []
    for i in range(n):
        keep = config.text_len if i == 0 else max(1, config.text_len // (i + 1))
        m = torch.zeros(1, config.text_len)
        m[:, :keep] = 1
        masks.append(m)
    return masks


def run_chain(views: list[PackageView], runners: list[Callable[[dict], dict]], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run packages in order, each fed by name from the package inputs and the earlier packages' outputs (the
    chunk contract of deploy/chunks.py; a single package is the one-element chain). Returns every value."""
    values = dict(feeds)
    for view, run in zip(views, runners):
        out = run({f["name"]: values[f["name"]] for f in view.inputs})
        values.update({f["name"]: np.asarray(out[f["name"]], dtype=np.float32) for f in view.outputs})
    return values


def run_package(view: PackageView, inputs, precision: str = "fp32", runtime: str = "auto",
                progress: Callable[[str, int, int], None] | None = None, masks: list | None = None,
                chain: list[PackageView] | None = None, runners: list[tuple[Callable[[dict], dict], str]] | None = None,
                first_chunk_outputs: list[dict[str, np.ndarray]] | None = None) -> tuple[list[np.ndarray], str]:
    """The denoiser output of `view` for each (latent, t, text); a chunk runs with the chain it belongs to
    (`chain` and its `runners` from package_runner, when the caller has them already). `first_chunk_outputs`, a
    list, receives each input's outputs of the chain's first chunk (verify_chunks' check of that chunk alone)."""
    views = chain or load_chain(view)
    runners, labels = zip(*(runners or [package_runner(v, precision, runtime) for v in views]))
    label = labels[0] + (f", a chain of {len(views)} chunks" if len(views) > 1 else "")
    outs = []
    for (latent, t, text), mask in zip(inputs, masks or [None] * len(inputs)):
        values = run_chain(views, runners, package_feeds(latent, t, text, mask))
        outs.append(values[OUTPUT])
        if first_chunk_outputs is not None:
            first_chunk_outputs.append({f["name"]: values[f["name"]] for f in views[0].outputs})
        if progress:
            progress(f"running the package ({label})", len(outs), len(inputs))
    return outs, label


def verify_chunks(views: list[PackageView], reference: DeployDiT, inputs, precision: str, runtime: str,
                  device: torch.device | str, inside: Callable[[tuple], tuple] | None = None,
                  runners: list[Callable[[dict], dict]] | None = None,
                  first_chunk_outputs: list[dict[str, np.ndarray]] | None = None) -> list[float]:
    """Each chunk alone: fed the torch reference's own carried tensors, its outputs against the reference's (the
    worst output and input), so a chunk's error is measured without the error of the chunks before it.
    `inside`: the package inputs as `reference` takes them (an fp16 graph's casts at its boundary).
    `first_chunk_outputs` (run_package's, same inputs): the first chunk alone is fed the package inputs, as it is
    in the chain, so its chain outputs are reused rather than computed again (without `inside` only)."""
    reuse_first = first_chunk_outputs is not None and inside is None
    inside = inside or (lambda xs: xs)
    chunks, io = split_deploy(reference, len(views), inside(tuple(x.to(device) for x in inputs[0])))
    for view, names in zip(views, io):
        have = ([f["name"] for f in view.inputs], [f["name"] for f in view.outputs])
        if have != (names.inputs, names.outputs):
            raise EdgeCompileError(f"chunk {view.path} does not take and return what edgecompile's split of this model does: "
                                   "re-export the chunks together")
    runners = runners or [package_runner(v, precision, runtime)[0] for v in views]
    worst_per_chunk = [math.inf] * len(views)
    for i, (latent, t, text) in enumerate(inputs):
        ref_inputs = chunk_example(chunks, io, inside(tuple(x.to(device) for x in (latent, t, text))))
        for k, (chunk, names, args) in enumerate(zip(chunks, io, ref_inputs)):
            with torch.no_grad():
                want = chunk(*args)
            want = want if isinstance(want, tuple) else (want,)
            if k == 0 and reuse_first:
                got = first_chunk_outputs[i]
            else:
                feeds = {n: a.float().cpu().numpy() if a.is_floating_point() else a.cpu().numpy() for n, a in zip(names.inputs, args)}
                got = runners[k](feeds)
            for name, w in zip(names.outputs, want):
                worst_per_chunk[k] = min(worst_per_chunk[k], psnr_db(w.float().cpu().numpy(), np.asarray(got[name], dtype=np.float32)))
    return worst_per_chunk


def verify_package(view: PackageView, ckpt: Checkpoint, simulated: DeployDiT | None = None, precision: str = "fp32",
                   runtime: str = "auto", min_psnr_db: float = DEFAULT_MIN_PSNR_DB,
                   device: torch.device | str = "cpu", progress: Callable[[str, int, int], None] | None = None) -> VerifyResult:
    """Run the package `view` and compare it with the reference of `ckpt` (see `checkpoint_for`).

    `simulated`, edgecompile's own compressed deploy graph (palettes decoded, distilled parameters loaded), is the
    reference of a palettized package and is built by the caller (compress.simulate); psnr_vs_checkpoint_db always
    compares against the unquantized checkpoint. A chunk is verified as the chain it belongs to, end to end, and
    each chunk alone (chunk_psnr_db). The result's `passed` says whether every PSNR reached `min_psnr_db` with
    finite outputs (see `check_passed`). The torch references run on `device` (`simulated` must live there too)."""
    check_verifiable(view, min_psnr_db)
    views = load_chain(view)  # read once: every package of a chain is parsed here and nowhere else below
    changed = [line for part in views for line in changed_weight_files(part)]  # tampering PSNR may not see
    if simulated is None and view.bits.palettized:
        raise ValueError("a palettized package is verified against its compressed simulation: pass `simulated`")
    width = view.width
    if changed and view.is_aimodel:  # Core AI's runtime aborts the process on a corrupted program: never load one
        return VerifyResult(package=str(view.path), runtime="not run (the program changed)", precision=precision, width=width,
                            psnr_db=math.nan, psnr_vs_checkpoint_db=math.nan, min_psnr_db=min_psnr_db, changed_weight_files=changed)
    inputs = verification_inputs(ckpt.config, view.latent_hw, ckpt=ckpt, width=width)
    masks = verification_masks(ckpt.config, len(inputs))
    start = time.perf_counter()
    runners = [package_runner(v, precision, runtime) for v in views]  # each package's runner made once
    first_chunk_outputs: list[dict[str, np.ndarray]] = []
    outs, label = run_package(view, inputs, precision=precision, runtime=runtime, progress=progress, masks=masks, chain=views,
                              runners=runners, first_chunk_outputs=first_chunk_outputs)
    package_seconds = time.perf_counter() - start
    reference_name = "edgecompile's compressed torch simulation" if simulated is not None else "fp32 torch reference of the checkpoint"
    chunk_reference = simulated if simulated is not None else None
    inside, computed_in = None, precision
    if view.is_aimodel and view.meta is not None and view.meta.compute == "float16":
        # Core AI's runtime computes an fp16 asset in fp16 only: its gate is against the same graph in torch's fp16,
        # as a Core ML package's is against its fp32 run; psnr_vs_checkpoint_db still says what fp16 costs
        from edgecompile.coreai.convert import DENOISER_FP16, Float16Boundary, fp16_graph, fp16_inputs

        names = input_names(ckpt.config)
        base = simulated if simulated is not None else deploy_model(ckpt.model, width, latent_hw=view.latent_hw).to(device)
        chunk_reference = fp16_graph(base, DENOISER_FP16.fp32_buffers)
        simulated = Float16Boundary(chunk_reference, names, DENOISER_FP16.fp32_inputs)
        inside = lambda xs: fp16_inputs(xs, names, DENOISER_FP16)  # noqa: E731
        computed_in, reference_name = "fp16", f"{reference_name.replace('fp32 torch reference', 'deploy graph')} in torch's fp16"
    start = time.perf_counter()
    reference = extract_width(ckpt.model, width, share=True).to(device)  # on the CPU: views, bit-identical to the supernetwork
    per, per_ckpt = [], []
    with torch.no_grad():
        for (latent, t, text), mask, out in zip(inputs, masks, outs):
            latent, t, text = latent.to(device), t.to(device), text.to(device)
            mask = None if mask is None else mask.to(device)
            ref = reference(latent, t, text_from_package(text), text_mask=mask).cpu().numpy()
            sim = ref if simulated is None else simulated(latent, t, text, mask).cpu().numpy()
            per.append(psnr_db(sim, out))
            per_ckpt.append(psnr_db(ref, out))
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    chunk_psnr = []
    if len(views) > 1:
        if chunk_reference is None:
            chunk_reference = deploy_model(ckpt.model, width, latent_hw=view.latent_hw).to(device)
        chunk_psnr = verify_chunks(views, chunk_reference, inputs, precision, runtime, device, inside,
                                   runners=[run for run, _ in runners], first_chunk_outputs=first_chunk_outputs)
    return VerifyResult(
        package=str(view.path), runtime=label, function=view.function if view.functions else None, precision=computed_in, width=width,
        psnr_db=worst(per), psnr_vs_checkpoint_db=worst(per_ckpt), per_input_psnr_db=per, chunk_psnr_db=chunk_psnr,
        reference=reference_name,
        min_psnr_db=min_psnr_db, non_finite_outputs=sum(not np.isfinite(o).all() for o in outs), changed_weight_files=changed,
        package_seconds=round(package_seconds, 3), reference_seconds=round(reference_seconds, 3),
        chunks_seconds=round(time.perf_counter() - start, 3),
    )

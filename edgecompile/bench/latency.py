"""Measured latency: the deploy graph in torch on this host (CPU, or CUDA / MPS when present), and Core ML itself
on macOS. Latency does not depend on weight values, so a package's graph is rebuilt from its metadata (config,
width, latent) with random weights; no checkpoint is needed.

Runs made elsewhere (e.g. on an iPhone with Xcode's performance report) are merged from JSON files:
    {"format": "edgecompile-bench-run", "device": "iPhone 16 Pro Max", "package": "toy_w0.5_fp16.mlpackage",
     "compute_units": "cpuAndNeuralEngine", "median_ms": 4.2, "p10_ms": 4.0, "p90_ms": 4.6, "runs": 50}
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from edgecompile.coreml.package import load_chain, load_package
from edgecompile.coremltools_loader import import_coremltools
from edgecompile.deploy.dit import DeployDiT
from edgecompile.errors import EdgeCompileError
from edgecompile.model.elastic import width_config

RUN_FORMAT = "edgecompile-bench-run"
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def host_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def summarise(samples_s: list[float]) -> dict:
    ms = sorted(1e3 * s for s in samples_s)
    q = lambda f: ms[min(len(ms) - 1, int(round(f * (len(ms) - 1))))]  # noqa: E731
    return {"median_ms": round(statistics.median(ms), 3), "p10_ms": round(q(0.1), 3), "p90_ms": round(q(0.9), 3),
            "min_ms": round(ms[0], 3), "runs": len(ms)}


@torch.no_grad()
def torch_latency(config, width: float, latent_hw: tuple[int, int], repeats: int = 10, warmup: int = 2,
                  device: str | None = None) -> dict:
    """Median and spread of the deploy graph's forward pass (fp32 on CPU, fp16 on GPUs)."""
    device = device or host_device()
    dense = width_config(config, width) if config.widths != (1.0,) else config
    torch.manual_seed(0)
    model = DeployDiT(dense, latent_hw).eval()
    dtype = torch.float16 if device in ("cuda", "mps") else torch.float32
    model = model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn((1, dense.latent_channels, *latent_hw), generator=g).to(device, dtype)
    t = torch.tensor([0.5], device=device, dtype=dtype)
    text = torch.randn((1, dense.text_dim, 1, dense.text_len), generator=g).to(device, dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    for _ in range(warmup):
        model(latent, t, text)
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(latent, t, text)
        sync()
        samples.append(time.perf_counter() - start)
    return {"runtime": f"torch {torch.__version__} {device} ({str(dtype).removeprefix('torch.')})", **summarise(samples)}


def coreai_latency(package: Path, repeats: int = 10, function: str | None = None) -> dict:
    """Core AI load and call latency of an `.aimodel`, measured through Core AI's runtime on this host (the local
    runtime's CPU on Linux, the OS framework on macOS 27+); inputs as the asset declares them."""
    import numpy as np

    from edgecompile.coreai.runtime import AIModelRunner

    view = load_package(package, function=function)
    rng = np.random.default_rng(0)
    feeds = {f["name"]: (rng.standard_normal(f["shape"]).astype(np.float32) if f["dtype"].startswith("float")
                         else np.zeros(f["shape"], np.int32)) for f in view.inputs}
    start = time.perf_counter()
    runner = AIModelRunner(Path(package), view.function)
    load_s = time.perf_counter() - start
    runner(feeds)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(feeds)
        samples.append(time.perf_counter() - start)
    runner.close()
    return {"runtime": "coreai-runtime", "load_s": round(load_s, 3), **summarise(samples)}


def coreml_latency(package: Path, repeats: int = 10, function: str | None = None) -> dict:
    """Core ML load and predict latency per compute-unit setting (macOS only). A chunk (--chunks) is timed as
    the chain it belongs to: one sample is one denoiser call through every chunk; `function` picks one function
    of a multifunction package."""
    if sys.platform != "darwin":
        return {"skipped": "Core ML runs only on macOS (coremltools on Linux cannot load or predict packages)"}
    import numpy as np

    ct = import_coremltools()
    chain = load_chain(load_package(package, function=function))
    rng = np.random.default_rng(0)
    feeds = {f["name"]: rng.standard_normal(f["shape"]).astype(np.float32) for f in chain[0].inputs}
    out: dict = {"chunks": len(chain)} if len(chain) > 1 else {}
    for unit in COMPUTE_UNITS:
        start = time.perf_counter()
        named = {"function_name": function} if function else {}
        models = [ct.models.MLModel(str(v.path), compute_units=getattr(ct.ComputeUnit, unit), **named) for v in chain]
        load_s = time.perf_counter() - start

        def predict():
            values = dict(feeds)
            for view, ml in zip(chain, models):
                values.update(ml.predict({f["name"]: values[f["name"]] for f in view.inputs}))

        predict()
        samples = []
        for _ in range(repeats):
            s = time.perf_counter()
            predict()
            samples.append(time.perf_counter() - s)
        out[unit] = {"load_ms": round(1e3 * load_s, 1), **summarise(samples)}
    try:  # device placement, when this coremltools and macOS provide the compute plan
        counts: dict[str, int] = {}
        for ml in models:
            plan = ct.models.compute_plan.MLComputePlan.load_from_path(ml.get_compiled_model_path(), compute_units=ct.ComputeUnit.ALL)
            for op in plan.model_structure.program.functions[function or "main"].block.operations:
                usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                name = type(usage.preferred_compute_device).__name__ if usage else "none"
                counts[name] = counts.get(name, 0) + 1
        out["placement"] = counts
    except Exception as e:  # noqa: BLE001  the compute plan API is optional
        out["placement"] = f"unavailable ({type(e).__name__})"
    return out


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        path = Path(p)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdgeCompileError(f"run file {path} cannot be read ({str(e).splitlines()[0]}): pass a JSON file in the documented format") from None
        items = data if isinstance(data, list) else [data]
        for item in items:
            if not isinstance(item, dict) or item.get("format") != RUN_FORMAT or "median_ms" not in item or "device" not in item:
                raise EdgeCompileError(f"run file {path} is not an {RUN_FORMAT} record (needs format, device, package, median_ms)")
            for key in ("median_ms", "p10_ms", "p90_ms"):
                v = item.get(key)
                if key in item and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                    raise EdgeCompileError(f"run file {path}: {key} = {v!r} is not a positive number of milliseconds")
            if not isinstance(item["device"], str):
                raise EdgeCompileError(f"run file {path}: device = {item['device']!r} is not text")
            runs.append({**item, "source": str(path)})
    return runs

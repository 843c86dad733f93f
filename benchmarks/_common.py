"""Helpers shared by the benchmark scripts: result files and a resource meter."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def write_result(name: str, data: dict, output_dir: Path | None = None) -> Path:
    out = Path(output_dir or RESULTS) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **data}
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return out


def peak_rss_gib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20  # Linux reports KiB


def run_child(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run one child; its own wall time and peak RSS (wait4), and its output when it fails."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        print(stdout[-2000:], stderr[-4000:], file=sys.stderr)
    return {"cmd": " ".join(str(c) for c in cmd[2:]), "rc": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "stdout": stdout}


def export_summary(step: dict, out: Path, width: str | None = None) -> dict:
    """A finished export child summarised from its report.json."""
    step.pop("stdout", None)
    folder = next(out.glob("w*"), None)
    if step["rc"] != 0 or folder is None:
        return step
    r = json.loads((folder / "report.json").read_text())
    verify = r.get("verify") or {}
    step.update({
        "stage_seconds": r["stage_seconds"], "stage_peak_memory_gib": r.get("stage_peak_memory_gib"),
        "calibration": {k: r["calibration"].get(k) for k in ("latent", "inputs", "device", "batch_size", "statistics_batch_size",
                                                             "gradient_batch_size", "statistics_groups", "distill_batch_size")}
        if "calibration" in r else None,
        "average_bits": r.get("average_bits"), "size_bytes": r["size_bytes"],
        "distill": {k: (r.get("distill") or {}).get(k) for k in ("planned_steps", "steps_run", "stopped", "step_seconds",
                                                               "holdout_psnr_before_db", "holdout_psnr_after_db")},
        "verify_psnr_db": verify.get("psnr_db"), "verify_psnr_vs_checkpoint_db": verify.get("psnr_vs_checkpoint_db"),
        "verified": bool(verify.get("passed")), "chunk_psnr_db": verify.get("chunk_psnr_db") or None,
        "chunks": [{k: ch[k] for k in ("package", "blocks", "size_bytes", "weight_file_bytes")} for ch in r.get("chunks", [])] or None,
        "recipe": str(folder / "recipe.json") if (folder / "recipe.json").exists() else None,
    })
    return step


def plain_conversion(model, example: tuple, names: tuple[str, ...] = ("latent", "timestep", "text")):
    """coremltools' own conversion of a torch model as it is (the baseline edgecompile's convert is measured
    against): trace, fp16, iOS17, the default pass pipeline. Returns the MLModel, not saved."""
    import numpy as np
    import torch

    from edgecompile.coremltools_loader import import_coremltools, quiet_coremltools

    ct = import_coremltools()
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    with quiet_coremltools():
        return ct.convert(traced, inputs=[ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32) for n, x in zip(names, example)],
                          convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT16)

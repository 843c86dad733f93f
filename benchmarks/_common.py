"""Helpers shared by the benchmark scripts: result files and a resource meter."""

from __future__ import annotations

import json
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

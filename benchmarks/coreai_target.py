"""The Core AI target against the Core ML one, and Apple's runtime as the MIL interpreter's oracle, on the bundled
checkpoint's widths (or another checkpoint's: a paper-scale one made by `edgecompile init recipes/snapgenpp.yaml`).

    python benchmarks/coreai_target.py [--checkpoint DIR] [--widths 0.375,0.5,1.0] [--latent 8x8]

Per width, from one deploy graph (its parameters rounded to fp16 values, as a Core ML package stores them):
- convert time: coremltools' conversion and coreai-torch's (torch.export, its decompositions, TorchConverter in
  RELEASE mode, save), both fp16 compute with the fp32 timestep island (what `export` writes), side by side in this
  run; and coreai-torch's fp32 conversion;
- the fp32 oracle: the same graph as an fp32 Core ML program executed by edgecompile's MIL interpreter, against the
  fp32 `.aimodel` executed by Core AI's runtime, on the verification inputs (worst PSNR), and each against torch;
- the fp16 oracle: the interpreter's fp16 emulation of the fp16 package against Core AI's runtime executing the fp16
  asset (two fp16 implementations of one graph), and each against the fp32 torch graph (what fp16 costs).
Results: benchmarks/results/coreai_target.json (rows merged by checkpoint, width and latent).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common
import torch

from edgecompile.coreai.convert import DENOISER_FP16, convert_to_aimodel
from edgecompile.coreai.runtime import AIModelRunner
from edgecompile.coreml.convert import convert_graph
from edgecompile.coreml.interpreter import MILInterpreter
from edgecompile.coreml.package import load_package
from edgecompile.coreml.verify import package_feeds, verification_inputs
from edgecompile.deploy.contract import OUTPUT, example_inputs, input_names
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.metrics import psnr_db
from edgecompile.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from edgecompile.model.elastic import extract_width


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a checkpoint folder (default: the bundled one)")
    ap.add_argument("--widths", default="0.375,0.5,1.0")
    ap.add_argument("--latent", default="8x8")
    ap.add_argument("--output")
    args = ap.parse_args()
    hw = tuple(int(v) for v in args.latent.split("x"))
    ckpt = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)
    label = "bundled default" if not args.checkpoint else f"{ckpt.config.name} ({Path(args.checkpoint).name}, random weights)"
    names = input_names(ckpt.config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgecompile-coreai-") as tmp:
        tmp = Path(tmp)
        for w in (float(v) for v in args.widths.split(",")):
            graph = deploy_model(extract_width(ckpt.model, w), latent_hw=hw).eval()
            with torch.no_grad():
                for t in [*graph.parameters(), *graph.buffers()]:
                    if t.is_floating_point():
                        t.copy_(t.half().float())
            example = example_inputs(graph)
            fp16, coreml_s = timed(lambda: convert_graph(graph, example, names, [OUTPUT]))
            fp16.save(str(tmp / f"w{w}_fp16.mlpackage"))
            fp32 = convert_graph(graph, example, names, [OUTPUT], compute_precision="float32")
            fp32.save(str(tmp / f"w{w}_fp32.mlpackage"))
            _, coreai_s = timed(lambda: convert_to_aimodel(graph, example, names, [OUTPUT], tmp / f"w{w}_fp16.aimodel", {}, fp16=DENOISER_FP16))
            _, coreai32_s = timed(lambda: convert_to_aimodel(graph, example, names, [OUTPUT], tmp / f"w{w}.aimodel", {}))
            runtime = AIModelRunner(tmp / f"w{w}.aimodel")
            runtime16 = AIModelRunner(tmp / f"w{w}_fp16.aimodel")
            interp32 = MILInterpreter(load_package(tmp / f"w{w}_fp32.mlpackage").program, precision="fp32").run
            interp16 = MILInterpreter(load_package(tmp / f"w{w}_fp16.mlpackage").program, precision="fp16").run
            worst: dict[str, list[float]] = {}
            for inputs in verification_inputs(ckpt.config, hw, ckpt=ckpt, width=w):
                feeds = package_feeds(*inputs)
                ai, ai16 = runtime(feeds)[OUTPUT], runtime16(feeds)[OUTPUT]
                mil, mil16 = interp32(feeds)[OUTPUT], interp16(feeds)[OUTPUT]
                with torch.no_grad():
                    ref = graph(*inputs).numpy()
                for key, (a, b) in {"interpreter_vs_coreai_runtime_db": (ai, mil), "coreai_runtime_vs_torch_db": (ref, ai),
                                    "interpreter_vs_torch_db": (ref, mil),
                                    "interpreter_fp16_vs_coreai_fp16_db": (ai16, mil16), "coreai_fp16_vs_torch_fp32_db": (ref, ai16),
                                    "interpreter_fp16_vs_torch_fp32_db": (ref, mil16)}.items():
                    worst.setdefault(key, []).append(psnr_db(a, b))
            runtime.close()
            runtime16.close()
            row = {"checkpoint": label, "width": w, "latent": list(hw), "params": sum(p.numel() for p in graph.parameters()),
                   "coremltools_convert_s": round(coreml_s, 1), "coreai_convert_s": round(coreai_s, 1),
                   "coreai_over_coremltools": round(coreai_s / coreml_s, 2), "coreai_fp32_convert_s": round(coreai32_s, 1),
                   **{k: round(min(v), 2) for k, v in worst.items()}}
            rows.append(row)
            print(row, flush=True)
    out_dir = Path(args.output) if args.output else _common.RESULTS
    old = out_dir / "coreai_target.json"
    if old.exists():  # rows of other checkpoints, widths or latents measured before are kept
        key = lambda r: (r.get("checkpoint", "bundled default"), r["width"], tuple(r["latent"]))  # noqa: E731
        mine = {key(r) for r in rows}
        rows = [r for r in json.loads(old.read_text()).get("rows", []) if key(r) not in mine] + rows
    path = _common.write_result("coreai_target", {
        "what": "one deploy graph per width (fp16-valued parameters): coremltools vs coreai-torch convert time (fp16 compute); the MIL "
                "interpreter vs Core AI's runtime on the verification inputs, worst PSNR, in fp32 (fp32 programs) and in fp16 (the "
                "interpreter's fp16 emulation of the fp16 package vs the fp16 .aimodel)",
        "rows": rows}, out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

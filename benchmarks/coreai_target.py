"""The Core AI target against the Core ML one, and Apple's runtime as the MIL interpreter's oracle, on the bundled
checkpoint's widths.

    python benchmarks/coreai_target.py [--widths 0.375,0.5,1.0] [--latent 8x8]

Per width, from one deploy graph (its parameters rounded to fp16 values, as a Core ML package stores them):
- convert time: coremltools' conversion (fp16 compute, what `export` writes) and coreai-torch's (torch.export,
  its decompositions, TorchConverter in RELEASE mode, save), side by side in this run;
- the oracle: the same graph as an fp32 Core ML program executed by edgecompile's MIL interpreter, against the
  `.aimodel` executed by Core AI's runtime, on the verification inputs (worst PSNR), and each against torch;
- the interpreter's fp16 emulation of the fp16 package against Core AI's fp32 result (what fp16 costs).
Results: benchmarks/results/coreai_target.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common
import torch

from edgecompile.coreai.convert import convert_to_aimodel
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
    ap.add_argument("--widths", default="0.375,0.5,1.0")
    ap.add_argument("--latent", default="8x8")
    ap.add_argument("--output")
    args = ap.parse_args()
    hw = tuple(int(v) for v in args.latent.split("x"))
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
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
            _, coreai_s = timed(lambda: convert_to_aimodel(graph, example, names, [OUTPUT], tmp / f"w{w}.aimodel", {}))
            runtime = AIModelRunner(tmp / f"w{w}.aimodel")
            interp32 = MILInterpreter(load_package(tmp / f"w{w}_fp32.mlpackage").program, precision="fp32").run
            interp16 = MILInterpreter(load_package(tmp / f"w{w}_fp16.mlpackage").program, precision="fp16").run
            oracle, vs_torch_coreai, vs_torch_interp, fp16_cost = [], [], [], []
            for inputs in verification_inputs(ckpt.config, hw, ckpt=ckpt, width=w):
                feeds = package_feeds(*inputs)
                ai = runtime(feeds)[OUTPUT]
                mil = interp32(feeds)[OUTPUT]
                with torch.no_grad():
                    ref = graph(*inputs).numpy()
                oracle.append(psnr_db(ai, mil))
                vs_torch_coreai.append(psnr_db(ref, ai))
                vs_torch_interp.append(psnr_db(ref, mil))
                fp16_cost.append(psnr_db(ai, interp16(feeds)[OUTPUT]))
            runtime.close()
            row = {"width": w, "latent": list(hw), "coremltools_convert_s": round(coreml_s, 1), "coreai_convert_s": round(coreai_s, 1),
                   "coreai_over_coremltools": round(coreai_s / coreml_s, 2),
                   "interpreter_vs_coreai_runtime_db": round(min(oracle), 2), "coreai_runtime_vs_torch_db": round(min(vs_torch_coreai), 2),
                   "interpreter_vs_torch_db": round(min(vs_torch_interp), 2), "interpreter_fp16_vs_coreai_fp32_db": round(min(fp16_cost), 2)}
            rows.append(row)
            print(row, flush=True)
    path = _common.write_result("coreai_target", {
        "what": "one deploy graph per width (fp16-valued parameters): coremltools vs coreai-torch convert time; the MIL interpreter "
                "(fp32 program) vs Core AI's runtime (.aimodel) on the verification inputs, worst PSNR",
        "rows": rows}, Path(args.output) if args.output else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The whole mixed-bit export of the paper-scale supernetwork at 1024x1024 (128x128 latent): per-stage wall time and
peak memory, the convert before and after its speed-up, and what compressing small costs.

    python benchmarks/export_scale.py [--width 0.375] [--latent 128x128] [--calibration-latent 32x32]
        [--compare-latent 64x64] [--device auto] [--convert-baseline REV] [--chunks 2 --chunk-width 1.0]
        [--sections convert,export,compare,chunks] [--workdir DIR] [--output DIR]

Sections, each a child process measured on its own (wall time; peak RSS from wait4):
1. init: a random paper-scale checkpoint (fp16 weights) from recipes/snapgenpp.yaml.
2. convert: the fp16 conversion of every width at --latent (time, the package's op count by type), and, for
   --width with uniform 4-bit palettes, this tree's convert against the same code at git revision
   --convert-baseline (the graph and LUT writing before the speed-up), run from a temporary git worktree.
3. export: `edgecompile export --bits mixed --calibration-latent C` at --latent, verified; report.json's
   per-stage seconds and peak memory (host RSS; CUDA allocations on a GPU).
4. compress-small fidelity: the same export with calibration and distillation at --compare-latent and the first
   export's recipe (same bits per layer); the full-resolution verification PSNR against the checkpoint of both.
5. chunks: an fp16 export of --chunk-width with --chunks N (each weight file under the Neural Engine's 2 GiB),
   each chunk verified alone and the chain end to end.
6. full: issue 29's target 2, the mixed-bit export of --full-width (the paper's 1.0, 1.46B) at --latent with --chunks N,
   calibrating at --calibration-latent, verified: wall time against 90 minutes, peak RSS against 16 GiB.
--sections runs some of them and adds to the committed results. Results go to benchmarks/results/export_scale.json after every section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common

EDGECOMPILE = [sys.executable, "-m", "edgecompile"]
PAPER_WIDTHS = ("0.375", "0.5", "1.0")


ALL_SECTIONS = ("convert", "export", "compare", "chunks", "full")


def convert_child(args: argparse.Namespace) -> None:
    """In a child (possibly another revision's tree): convert one width, print seconds and op counts as JSON.
    Uses only APIs that the baseline revision has too."""
    if os.environ.get("BASELINE_TREE"):  # that tree's edgecompile, ahead of the one _common put first
        sys.path.insert(0, os.environ["BASELINE_TREE"])
    import edgecompile
    from edgecompile.compress.palettize_model import PaletteCache, palettize_deploy, uniform_bits
    from edgecompile.coreml.convert import convert_to_mlmodel
    from edgecompile.deploy.rewrite import deploy_model
    from edgecompile.model.checkpoint import load_checkpoint
    from edgecompile.model.elastic import extract_width

    hw = tuple(int(v) for v in args.latent.split("x"))
    deploy = deploy_model(extract_width(load_checkpoint(args.checkpoint).model, float(args.width), share=True), latent_hw=hw)
    palettes = None
    if args.convert_bits != 16:
        palettes = palettize_deploy(deploy, uniform_bits(deploy, args.convert_bits), None, PaletteCache(deploy, None))
    start = time.perf_counter()
    ml = convert_to_mlmodel(deploy, palettes=palettes)
    seconds = time.perf_counter() - start
    ops = Counter(op.type for f in ml.get_spec().mlProgram.functions.values()
                  for b in f.block_specializations.values() for op in b.operations)
    print(json.dumps({"source": str(Path(edgecompile.__file__).parent), "convert_seconds": round(seconds, 1), "ops": sum(ops.values()),
                      "non_const_ops": sum(n for t, n in ops.items() if t != "const"), "op_types": dict(ops.most_common())}))


def parse_child_json(step: dict) -> dict:
    return json.loads(step.pop("stdout").strip().splitlines()[-1]) if step["rc"] == 0 else {"stdout_tail": step.pop("stdout")[-500:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(_common.ROOT / "recipes" / "snapgenpp.yaml"))
    ap.add_argument("--width", default="0.375")
    ap.add_argument("--latent", default="128x128")
    ap.add_argument("--calibration-latent", default="32x32")
    ap.add_argument("--compare-latent", default="64x64", help="the compress-small comparison ('none' to skip)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--convert-baseline", default="79f88e5", help="git revision before the convert speed-up ('none' to skip)")
    ap.add_argument("--convert-widths", default=",".join(PAPER_WIDTHS), help="widths whose fp16 convert is measured")
    ap.add_argument("--distill-budget", help="minutes, passed to export (default: export's own default)")
    ap.add_argument("--chunks", type=int, default=2, help="the chunks section: --chunks of an fp16 export of --chunk-width")
    ap.add_argument("--chunk-width", default="1.0")
    ap.add_argument("--full-width", default="1.0", help="the full section's width")
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS))
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    # child mode
    ap.add_argument("--convert-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--convert-bits", type=int, default=16, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.convert_child:
        return convert_child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgecompile-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    sections = set(args.sections.split(","))
    result = {"config": args.config, "width": args.width, "latent": args.latent, "calibration_latent": args.calibration_latent,
              "device": args.device, "target_minutes": 60, "target_peak_gib": 16, "steps": {}}
    output = Path(args.output) if args.output else None
    previous = (output or _common.RESULTS) / "export_scale.json"
    if sections != set(ALL_SECTIONS) and previous.exists():
        # A partial run (e.g. --sections compare) adds to the committed results rather than replacing them.
        kept = json.loads(previous.read_text())
        result = {**{k: v for k, v in kept.items() if k not in ("benchmark", "machine", "date")}, "steps": kept["steps"]}

    def save() -> None:
        _common.write_result("export_scale", result, output)

    def report(name: str, step: dict) -> None:
        result["steps"][name] = step
        print(f"{name}: rc={step['rc']} wall {step['wall_s']:.0f} s, peak RSS {step['peak_rss_gib']:.2f} GiB", flush=True)
        save()

    if not (ckpt / "model.safetensors").exists():
        step = _common.run_child(EDGECOMPILE + ["init", args.config, "-o", str(ckpt), "--dtype", "float16", "--force"])
        step.pop("stdout")
        report("init", step)
    me = [sys.executable, str(Path(__file__).resolve()), "--convert-child", "--checkpoint", str(ckpt), "--latent", args.latent]

    if "convert" in sections:
        for w in args.convert_widths.split(","):
            step = _common.run_child(me + ["--width", w])
            step.update(parse_child_json(step))
            report(f"convert_fp16_w{w}", step)
        step = _common.run_child(me + ["--width", args.width, "--convert-bits", "4"])
        step.update(parse_child_json(step))
        report(f"convert_4bit_w{args.width}", step)
        if args.convert_baseline != "none":
            tree = work / "baseline-tree"
            if not tree.exists():
                subprocess.run(["git", "-C", str(_common.ROOT), "worktree", "add", "--detach", str(tree), args.convert_baseline],
                               check=True, capture_output=True)
            env = {**os.environ, "PYTHONPATH": str(tree), "BASELINE_TREE": str(tree)}
            step = _common.run_child(me + ["--width", args.width, "--convert-bits", "4"], env=env, cwd=tree)
            step.update(parse_child_json(step))
            step["revision"] = args.convert_baseline
            report(f"convert_4bit_w{args.width}_baseline", step)
            subprocess.run(["git", "-C", str(_common.ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
            new, old = result["steps"][f"convert_4bit_w{args.width}"], result["steps"][f"convert_4bit_w{args.width}_baseline"]
            if new["rc"] == 0 and old["rc"] == 0:
                result["convert_speedup"] = round(old["convert_seconds"] / new["convert_seconds"], 2)
                print(f"convert (4-bit, width {args.width}): {old['convert_seconds']:.0f} s at {args.convert_baseline} -> "
                      f"{new['convert_seconds']:.0f} s ({result['convert_speedup']}x); ops {old['ops']} -> {new['ops']}")
                save()

    export = ["export", str(ckpt), "--width", args.width, "--latent", args.latent, "--bits", "mixed", "--device", args.device,
              "--force", "--json"] + (["--distill-budget", args.distill_budget] if args.distill_budget else [])
    main_out = work / "export"
    if "export" in sections:
        step = _common.run_child(EDGECOMPILE + export + ["--calibration-latent", args.calibration_latent, "-o", str(main_out)])
        step = _common.export_summary(step, main_out, args.width)
        step["within_targets"] = step["rc"] == 0 and step["wall_s"] <= 60 * 60 and step["peak_rss_gib"] < 16
        report("export", step)
        print(json.dumps({k: step.get(k) for k in ("stage_seconds", "verify_psnr_db", "verify_psnr_vs_checkpoint_db", "distill")}))
    if "compare" in sections and args.compare_latent != "none" and result["steps"].get("export", {}).get("rc") == 0:
        out = work / "export-compare"
        step = _common.run_child(EDGECOMPILE + export + ["--calibration-latent", args.compare_latent, "--recipe",
                                                 result["steps"]["export"]["recipe"], "-o", str(out)])
        step = _common.export_summary(step, out, args.width)
        report("export_compare", step)
        if step["rc"] == 0:
            small, big = result["steps"]["export"], step
            result["compress_small"] = {
                "calibration_latents": [args.calibration_latent, args.compare_latent],
                "verify_psnr_vs_checkpoint_db": [small["verify_psnr_vs_checkpoint_db"], big["verify_psnr_vs_checkpoint_db"]],
                "cost_db": round(big["verify_psnr_vs_checkpoint_db"] - small["verify_psnr_vs_checkpoint_db"], 2),
            }
            print("compress small:", result["compress_small"])
            save()
    if "chunks" in sections:
        # the full width in fp16 is over the Neural Engine's 2 GiB weight file: --chunks puts each chunk under it
        out = work / "export-chunks"
        step = _common.run_child(EDGECOMPILE + ["export", str(ckpt), "--width", args.chunk_width, "--latent", args.latent, "--bits", "16",
                                                "--chunks", str(args.chunks), "--force", "--json", "-o", str(out)])
        step = _common.export_summary(step, out)
        if step.get("chunks"):
            step["largest_weight_file_gib"] = round(max(c["weight_file_bytes"] for c in step["chunks"]) / 2**30, 3)
        report("export_chunks", step)
    if "full" in sections:
        out = work / "export-full"
        step = _common.run_child(EDGECOMPILE + ["export", str(ckpt), "--width", args.full_width, "--latent", args.latent, "--bits", "mixed",
                                                "--chunks", str(args.chunks), "--device", args.device, "--calibration-latent",
                                                args.calibration_latent, "--force", "--json", "-o", str(out)])
        step = _common.export_summary(step, out, args.full_width)
        step["targets"] = {"minutes": 90, "peak_rss_gib": 16}
        step["within_targets"] = step["rc"] == 0 and step["wall_s"] <= 90 * 60 and step["peak_rss_gib"] <= 16
        report(f"export_w{args.full_width}_mixed_chunks{args.chunks}", step)
        print(json.dumps({k: step.get(k) for k in ("stage_seconds", "stage_peak_memory_gib", "verify_psnr_db", "verify_psnr_vs_checkpoint_db",
                                                    "calibration", "within_targets")}))
    print(f"wrote {_common.RESULTS / 'export_scale.json' if output is None else output / 'export_scale.json'}")


if __name__ == "__main__":
    main()

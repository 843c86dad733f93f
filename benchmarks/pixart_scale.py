"""PixArt-Sigma XL/2 at 1024x1024 (128x128 latent) through edgecompile, against a plain coremltools conversion of
the same diffusers model in the same run.

    python benchmarks/pixart_scale.py [--latent 128x128] [--calibration-latent 32x32] [--sections ...] [--workdir DIR]

Sections, each a child process measured on its own (wall time; peak RSS from wait4):
1. make: PixArt-Sigma's published XL/2 transformer config (28 blocks, hidden 1152, 16 heads, patch 2, 4 latent
   channels, learned sigma, 4096-dim T5 captions), random-initialised by diffusers and saved in fp16 with
   save_pretrained, as the published weights are (no download: the weights are random, the shapes are real).
2. import: `edgecompile import` (fp16 checkpoint).
3. fp16 / mixed: `edgecompile export --bits 16` and `--bits mixed --calibration-latent C` at --latent, verified;
   per-stage seconds and peak memory from report.json, package size, op census and layout ops (`inspect`).
4. plain: coremltools' own conversion of the diffusers model (torch.jit.trace, fp16 compute, default passes) at the
   same latent and text length: time, peak memory, size, op census.
5. bench: `edgecompile bench --no-host` latency estimates (cost model) for the two packages.
Results go to benchmarks/results/pixart_scale.json after every section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common

EDGECOMPILE = [sys.executable, "-m", "edgecompile"]
ALL_SECTIONS = ("make", "import", "fp16", "mixed", "plain", "bench")
# PixArt-Sigma-XL-2-1024-MS's transformer/config.json (the published values that shape the model)
SIGMA_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, cross_attention_dim=1152,
                sample_size=128, patch_size=2, caption_channels=4096, use_additional_conditions=False, interpolation_scale=None,
                attention_bias=True, activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False,
                norm_eps=1e-6, num_embeds_ada_norm=1000)
TEXT_LEN = 300  # PixArt-Sigma's max_sequence_length


def make_child(out: str) -> None:
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**SIGMA_XL)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.float16).save_pretrained(out)
    print(json.dumps({"params": params}))


def plain_child(source: str, latent: str, out: str) -> None:
    """coremltools' conversion of the diffusers model as it is: trace, fp16, the default pass pipeline."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from edgecompile.coremltools_loader import import_coremltools

    import_coremltools()  # imported before the clock starts, as the export has it
    h, w = (int(v) for v in latent.split("x"))
    model = PixArtTransformer2DModel.from_pretrained(source, torch_dtype=torch.float32).eval()

    class Denoiser(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent, timestep, text):
            return self.m(latent, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]

    example = (torch.randn(1, 4, h, w), torch.tensor([500.0]), torch.randn(1, TEXT_LEN, 4096))
    start = time.perf_counter()
    ml = _common.plain_conversion(Denoiser(model), example)
    seconds = time.perf_counter() - start
    ml.save(out)
    ops = Counter(op.type for f in ml.get_spec().mlProgram.functions.values() for b in f.block_specializations.values() for op in b.operations)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(json.dumps({"convert_seconds": round(seconds, 1), "ops": sum(ops.values()), "non_const_ops": sum(n for t, n in ops.items() if t != "const"),
                      "layout_ops": sum(ops.get(t, 0) for t in ("transpose", "reshape")), "size_bytes": size,
                      "op_types": dict(ops.most_common(12))}))


def census(package: Path) -> dict:
    step = _common.run_child(EDGECOMPILE + ["inspect", str(package), "--json"])
    if step["rc"] != 0:
        return {}
    data = json.loads(step["stdout"])
    ops = data["ops"]
    return {"ops": sum(ops.values()), "non_const_ops": sum(n for t, n in ops.items() if t != "const"),
            "layout_ops": sum(ops.get(t, 0) for t in ("transpose", "reshape")), "weight_bytes": data["weight_bytes"],
            "op_types": dict(Counter(ops).most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", default="128x128")
    ap.add_argument("--calibration-latent", default="32x32")
    ap.add_argument("--distill-budget", help="minutes, passed to export (default: export's own default)")
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS))
    ap.add_argument("--workdir")
    ap.add_argument("--output")
    ap.add_argument("--make-child", help=argparse.SUPPRESS)
    ap.add_argument("--plain-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_child:
        return make_child(args.make_child)
    if args.plain_child:
        return plain_child(args.plain_child[0], args.latent, args.plain_child[1])

    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgecompile-pixart-"))
    work.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))
    output = Path(args.output) if args.output else None
    previous = (output or _common.RESULTS) / "pixart_scale.json"
    result = {"model": "PixArt-Sigma XL/2 config, random init (diffusers)", "diffusers_config": SIGMA_XL, "latent": args.latent,
              "text_len": TEXT_LEN, "calibration_latent": args.calibration_latent, "steps": {}}
    if sections != set(ALL_SECTIONS) and previous.exists():  # a partial run adds to the committed results
        kept = json.loads(previous.read_text())
        result = {**{k: v for k, v in kept.items() if k not in ("benchmark", "machine", "date")}, "steps": kept["steps"]}
    me = [sys.executable, str(Path(__file__).resolve())]
    source, ckpt = work / "diffusers", work / "ckpt"

    def report(name: str, step: dict) -> None:
        result["steps"][name] = step
        print(f"{name}: rc={step['rc']} wall {step['wall_s']:.0f} s, peak RSS {step['peak_rss_gib']:.2f} GiB", flush=True)
        _common.write_result("pixart_scale", result, output)

    if "make" in sections:
        step = _common.run_child(me + ["--make-child", str(source)])
        step.update(json.loads(step.pop("stdout").strip().splitlines()[-1]) if step["rc"] == 0 else {})
        report("make", step)
    if "import" in sections:
        step = _common.run_child(EDGECOMPILE + ["import", str(source), "-o", str(ckpt), "--dtype", "float16", "--force"])
        step.pop("stdout")
        report("import", step)
    budget = ["--distill-budget", args.distill_budget] if args.distill_budget else []

    def export(bits: str) -> None:
        out = work / bits
        extra = ["--bits", "16"] if bits == "fp16" else ["--bits", "mixed", "--calibration-latent", args.calibration_latent, *budget]
        step = _common.run_child(EDGECOMPILE + ["export", str(ckpt), "--latent", args.latent, "-o", str(out), "--force", "--json", *extra])
        step = _common.export_summary(step, out)
        package = next(out.glob("w*/*.mlpackage"), None)
        if step["rc"] == 0 and package is not None:
            step["package"] = str(package)
            step["census"] = census(package)
        report(f"export_{bits}", step)

    if "fp16" in sections:
        export("fp16")
    if "plain" in sections:
        step = _common.run_child(me + ["--latent", args.latent, "--plain-child", str(source), str(work / "plain.mlpackage")])
        step.update(json.loads(step.pop("stdout").strip().splitlines()[-1]) if step["rc"] == 0 else {})
        report("coremltools_plain_fp16", step)
        ours = result["steps"].get("export_fp16", {})
        if step["rc"] == 0 and ours.get("census"):
            result["edgecompile_vs_plain"] = {
                "convert_seconds": [ours["stage_seconds"]["convert"], step["convert_seconds"]],
                "ops": [ours["census"]["ops"], step["ops"]], "layout_ops": [ours["census"]["layout_ops"], step["layout_ops"]],
                "size_bytes": [ours["size_bytes"], step["size_bytes"]]}
            _common.write_result("pixart_scale", result, output)
    if "mixed" in sections:
        export("mixed")
    if "bench" in sections:
        packages = [result["steps"][k]["package"] for k in ("export_fp16", "export_mixed") if result["steps"].get(k, {}).get("package")]
        if packages:
            # the cost model's estimates; torch host timing of a 0.6B model at 1024^2 on this CPU is left out (--no-host)
            step = _common.run_child(EDGECOMPILE + ["bench", *packages, "-o", str(work / "bench"), "--force", "--no-host"])
            step.pop("stdout")
            bench_json = work / "bench" / "bench.json"
            if step["rc"] == 0 and bench_json.exists():
                data = json.loads(bench_json.read_text())
                step["estimates"] = [{k: item.get(k) for k in ("item", "bits", "weight_bytes", "estimates_ms")}
                                     | {"total_macs": item["static"]["total_macs"], "ops": item["static"]["ops"]} for item in data["items"]]
            report("bench", step)
    print(f"wrote {(output or _common.RESULTS) / 'pixart_scale.json'}")


if __name__ == "__main__":
    main()

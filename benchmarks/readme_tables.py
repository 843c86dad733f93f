"""Print the README's result tables from the committed files in benchmarks/results/ (so README figures are
copied from benchmark output, never typed by hand).

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import json

import _common


def header(*columns: str) -> None:
    """A markdown table's header row and separator."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def load(name: str):
    path = _common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def quality() -> None:
    data = load("default_model_quality")
    if not data:
        return
    prov = data["provenance"]
    header("width", "params", "accuracy, 4 Euler steps", "accuracy, 20 Euler steps")
    from edgecompile.model.config import ModelConfig
    from edgecompile.model.elastic import count_params

    config = ModelConfig.load(_common.ROOT / "recipes" / "toy.yaml")
    for w, row in prov["sample_accuracy"].items():
        print(f"| {w} | {count_params(config, float(w)) / 1e6:.2f} M | {row['accuracy_4_steps']:.1%} | {row['accuracy_20_steps']:.1%} |")
    print(f"\nTraining: {prov['steps']} steps in {prov['train_seconds'] / 60:.1f} min on {prov['machine']}.\n")


def census() -> None:
    data = load("graph_census")
    if not data:
        return
    print(f"Layout ops (transpose + reshape) per block, {data['config']} width {data['width']}, latent {data['latent']}:\n")
    header("block", "reference (B,L,D) conversion", "edgecompile", "ratio")
    for b in data["blocks"]:
        r, o = sum(b["reference"].values()), sum(b["edgecompile"].values())
        print(f"| {b['block']} | {r} | {o} | {b['ratio']:.1f}x |")
    wm = data["whole_model"]
    print(f"| whole model | {wm['reference']} | {wm['edgecompile']} | {wm['ratio']:.1f}x |\n")


def kmeans() -> None:
    data = load("kmeans_speed")
    if not data:
        return
    header("tensor", "bits", "group", "edgecompile", "coremltools", "speedup", "MSE ratio")
    for r in data["cases"]:
        print(f"| {r['tensor']} | {r['nbits']} | {r['group_size'] or '-'} | {r['seconds_edgecompile']:.3f} s | "
              f"{r['seconds_coremltools']:.3f} s | {r['speedup']:.1f}x | {r['mse_ratio']:.5f} |")
    rows = data.get("exactness")
    if rows:
        worst = max(rows, key=lambda r: r["sse_ratio"])
        median = sorted(r["sse_ratio"] for r in rows)[len(rows) // 2]
        print(f"\nThe clustering alone against the exact DP on every distinct value ({len(rows)} tensor x bit-width cases, "
              f"{len({r['tensor'] for r in rows})} tensors at 4, 6 and 8 bits): worst error ratio {worst['sse_ratio']:.5f} "
              f"({worst['tensor']}, {worst['nbits']}-bit), median {median:.5f}.")
    print()


def scale() -> None:
    data = load("export_scale")
    if not data:
        return
    print(f"Paper-scale export ({data['config'].split('/')[-1]}, width {data['width']}, latent {data['latent']}):\n")
    header("step", "exit", "wall time", "peak RSS")
    for name, s in data["steps"].items():
        print(f"| {name} | {s['rc']} | {s['wall_s']:.0f} s | {s['peak_rss_gib']:.2f} GiB |")
    if data.get("package_bytes"):
        print(f"\nPackage size: {data['package_bytes'] / 2**30:.2f} GiB.")
    print()


def quantization() -> None:
    data = load("quantization_quality")
    if not data:
        return
    for w, r in data["widths"].items():
        print(f"Width {w} (unquantized sample accuracy {r['unquantized_sample_accuracy']:.0%}; {r['evaluation_inputs']} held-out inputs):\n")
        header("setting", "avg bits", "denoiser PSNR", "final-sample PSNR", "sample accuracy")
        for name, row in r["settings"].items():
            print(f"| {name} | {row['average_bits']:.2f} | {row['denoiser_psnr_db']:.1f} dB | {row['sample_psnr_db']:.1f} dB | {row['sample_accuracy']:.0%} |")
        c = r["sweep_cost_forward_passes"]
        print(f"\nSweep cost: local {c['local']} forward passes ({r['sweep_seconds']['local']} s with k-means), "
              f"e2e {c['e2e']} passes of its {r['e2e_sweep_inputs']}-input subset ({r['sweep_seconds']['e2e']} s).\n")


def distillation() -> None:
    """Issue 5's check per width: what self-distillation and the bias-correction baseline add to each base."""
    data = load("quantization_quality")
    if not data:
        return
    header("width", "base", "denoiser PSNR", "+ bias correction", "+ self-distillation", "final-sample PSNR, before -> distilled")
    for w, r in data["widths"].items():
        rows = r["settings"]
        for base in ("uniform 4-bit", "mixed 4.3 local sweep"):
            b, bc, sd = rows[base], rows[f"{base} + bias correction"], rows[f"{base} + self-distillation"]
            print(f"| {w} | {base} | {b['denoiser_psnr_db']:.1f} dB | {bc['denoiser_psnr_db'] - b['denoiser_psnr_db']:+.1f} dB | "
                  f"{sd['denoiser_psnr_db'] - b['denoiser_psnr_db']:+.1f} dB | {b['sample_psnr_db']:.1f} -> {sd['sample_psnr_db']:.1f} dB |")
    print()


def sweep_scale() -> None:
    data = load("sweep_scale")
    if not data:
        return
    print(f"Paper-scale sweep: width {data['width']} ({data['params'] / 1e6:.0f}M parameters, {data['palettizable_layers']} layers), "
          f"{data['calibration_inputs']} calibration inputs at latent {data['latent'][0]}x{data['latent'][1]}: local sweep {data['seconds']:.0f} s "
          f"({data['kmeans_seconds']:.0f} s of it k-means) = {data['cost_forward_passes']} forward passes of {data['forward_seconds']:.1f} s; "
          f"the e2e sweep would take {data['e2e_forward_passes']} passes, about {data['e2e_estimated_seconds']:.0f} s (estimated from the measured pass).\n")


def cost_model() -> None:
    path = _common.RESULTS / "bench_report" / "bench.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    cm = data["cost_model"]["devices"]["iphone16promax"]
    c = cm["coefficients"]
    print(f"Cost model, {cm['device']}: fitted {c['matrix_gmacs']:.0f} GMAC/s (convolutions), {c['attention_gmacs']:.0f} GMAC/s (attention), "
          f"{c['op_overhead_us']:.2f} us per op, {cm['memory_gbps']} GB/s.\n")
    header("set", "model", "GMACs (conv)", "paper", "estimate", "error")
    for kind in ("calibration", "validation"):
        for r in cm[kind]:
            print(f"| {kind} | {r['model']} | {r['gmacs']:.0f} ({r['conv_gmacs']:.0f}) | {r['paper_ms']} ms | "
                  f"{r['estimate_ms']:.0f} ms | {r['error_pct']:+.1f}% |")
    print(f"\nWorst calibration error {cm['calibration_error_pct']}%, worst validation error {cm['validation_error_pct']}%.\n")
    header("item", "GMACs/step", "attention share", "est. iPhone 16 Pro Max", "est. iPhone 12", "host median (latent)")
    for r in data["items"]:
        s = r["static"]
        attn = sum(v for k, v in s["macs"].items() if k.startswith("attn")) / max(s["total_macs"], 1)
        host = f"{r['host']['median_ms']:.1f} ms ({r['host']['latent'][0]}x{r['host']['latent'][1]})" if "host" in r else "-"
        print(f"| {r['item']} | {s['total_macs'] / 1e9:.2f} | {attn:.0%} | {r['estimates_ms']['iphone16promax']:.1f} ms | "
              f"{r['estimates_ms']['iphone12']:.1f} ms | {host} |")
    print()


if __name__ == "__main__":
    for section in (quality, census, kmeans, scale, quantization, distillation, sweep_scale, cost_model):
        section()

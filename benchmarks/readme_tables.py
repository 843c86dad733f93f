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
        header("setting", "avg bits", "held-out denoiser PSNR", "final-sample PSNR", "sample accuracy")
        for name, row in r["settings"].items():
            extra = ""
            if "distill" in row:
                d = row["distill"]
                extra = f" ({d['steps_run']} steps, {d['stopped']})"
            print(f"| {name}{extra} | {row['average_bits']:.2f} | {row['heldout_psnr_db']:.1f} dB | {row['sample_psnr_db']:.1f} dB | "
                  f"{row['sample_accuracy']:.0%} |")
        c, t = r["sweep_cost_forward_passes"], r["palette_seconds"]
        print("\nSweep cost in forward passes of the calibration set: " + ", ".join(f"{m} {v}" for m, v in c.items())
              + f" (e2e on its {r['e2e_sweep_inputs']}-input subset). Uniform 4-bit palette time: "
              + ", ".join(f"{m} {v} s" for m, v in t.items()) + " (edgecompile's weighted methods include the layer statistics, "
              f"{r['statistics']['seconds']} s = {r['statistics']['cost_forward_passes']} forward passes).\n")


def palettes_vs_skm() -> None:
    """Issue 16's targets per width, from the same file."""
    data = load("quantization_quality")
    if not data:
        return
    header("width", "plain", "weighted", "output-aware", "SKMPalettizer", "output-aware - plain", "output-aware - SKM", "speed vs SKM",
           "propagated vs e2e sweep (4.3 bits)", "default export, distilled")
    for w, r in data["widths"].items():
        s, t = r["settings"], r["palette_seconds"]
        u = {m: s[f"uniform 4-bit, {m}"]["heldout_psnr_db"] for m in ("plain", "weighted", "output-aware", "coremltools SKMPalettizer")}
        prop = s["mixed 4.3, output-aware, propagated sweep"]["heldout_psnr_db"]
        e2e = s["mixed 4.3, output-aware, e2e sweep"]["heldout_psnr_db"]
        conv = next(v for k, v in s.items() if "the default export" in k)
        print(f"| {w} | {u['plain']:.1f} dB | {u['weighted']:.1f} dB | {u['output-aware']:.1f} dB | {u['coremltools SKMPalettizer']:.1f} dB | "
              f"{u['output-aware'] - u['plain']:+.1f} dB | {u['output-aware'] - u['coremltools SKMPalettizer']:+.1f} dB | "
              f"{t['SKMPalettizer'] / t['output-aware']:.1f}x | {prop:.1f} vs {e2e:.1f} dB | {conv['heldout_psnr_db']:.1f} dB |")
    print()


def position_table() -> None:
    data = load("quantization_quality")
    if not data:
        return
    header("width", "table (fp16)", "share of the 4-bit weights", "unquantized model with the table at 4 bits")
    for w, r in data["widths"].items():
        p = r["position_table"]
        print(f"| {w} | {p['fp16_bytes']:,} B | {p['share_of_4bit_weight_bytes']:.1%} | {p['psnr_if_4bit_db']:.1f} dB |")
    print()


def sweep_scale() -> None:
    data = load("sweep_scale")
    if not data:
        return
    print(f"Paper-scale sweep: width {data['width']} ({data['params'] / 1e6:.0f}M parameters, {data['palettizable_layers']} layers), "
          f"{data['calibration_inputs']} calibration inputs at latent {data['latent'][0]}x{data['latent'][1]}:\n")
    header("sweep", "palettes", "wall time", "of it palettes", "cost in forward passes", "peak RSS")
    for mode, r in data["sweeps"].items():
        print(f"| {mode} | {r['palettes']} | {r['seconds']:.0f} s | {r['kmeans_seconds']:.0f} s | {r['cost_forward_passes']} "
              f"(of {r['forward_seconds']:.1f} s) | {r['peak_rss_gib']:.1f} GiB |")
    print(f"\nThe e2e sweep would take {data['e2e_forward_passes']} passes, about {data['e2e_estimated_seconds']:.0f} s (estimated from the "
          "measured pass).\n")


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
    for section in (quality, census, kmeans, scale, quantization, palettes_vs_skm, position_table, sweep_scale, cost_model):
        section()

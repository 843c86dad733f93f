"""Print the README's result tables from the committed files in benchmarks/results/ (so README figures are
copied from benchmark output, never typed by hand).

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import json

import _common


def load(name: str):
    path = _common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def quality() -> None:
    data = load("default_model_quality")
    if not data:
        return
    prov = data["provenance"]
    print("| width | params | accuracy, 4 Euler steps | accuracy, 20 Euler steps |")
    print("|---|---|---|---|")
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
    print("| block | reference (B,L,D) conversion | edgecompile | ratio |")
    print("|---|---|---|---|")
    for b in data["blocks"]:
        r, o = sum(b["reference"].values()), sum(b["edgecompile"].values())
        print(f"| {b['block']} | {r} | {o} | {b['ratio']:.1f}x |")
    wm = data["whole_model"]
    print(f"| whole model | {wm['reference']} | {wm['edgecompile']} | {wm['ratio']:.1f}x |\n")


def kmeans() -> None:
    data = load("kmeans_speed")
    if not data:
        return
    print("| tensor | bits | group | edgecompile | coremltools | speedup | MSE ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in data["cases"]:
        print(f"| {r['tensor']} | {r['nbits']} | {r['group_size'] or '-'} | {r['seconds_edgecompile']:.3f} s | "
              f"{r['seconds_coremltools']:.3f} s | {r['speedup']:.1f}x | {r['mse_ratio']:.5f} |")
    print()


def scale() -> None:
    data = load("export_scale")
    if not data:
        return
    print(f"Paper-scale export ({data['config'].split('/')[-1]}, width {data['width']}, latent {data['latent']}):\n")
    print("| step | exit | wall time | peak RSS |")
    print("|---|---|---|---|")
    for name, s in data["steps"].items():
        print(f"| {name} | {s['rc']} | {s['wall_s']:.0f} s | {s['peak_rss_gib']:.2f} GiB |")
    if data.get("package_bytes"):
        print(f"\nPackage size: {data['package_bytes'] / 2**30:.2f} GiB.")
    print()


if __name__ == "__main__":
    for section in (quality, census, kmeans, scale):
        section()

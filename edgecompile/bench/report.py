"""`edgecompile bench`: one report (JSON, markdown, standalone HTML with PNG plots) from packages and configs."""

from __future__ import annotations

import json

import base64
from dataclasses import dataclass, field
from pathlib import Path

from edgecompile.atomic import atomic_path, check_output_path
from edgecompile.bench.cost_model import find_profile, calibrated, estimate_ms
from edgecompile.bench.latency import coreai_latency, coreml_latency, load_runs, torch_latency
from edgecompile.bench.static import GraphStats, program_stats, OP_CLASSES, deploy_graph_stats
from edgecompile.coreml.package import load_chain, load_package, weight_census
from edgecompile.errors import EdgeCompileError
from edgecompile.export_report import ExportReport
from edgecompile.jsonutil import dumps
from edgecompile.model.config import ModelConfig, width_label

DEFAULT_DEVICES = ("iphone16promax", "iphone12")


@dataclass
class BenchItem:
    """A package, or a config at one width (for models too large to export just to time them)."""
    label: str
    config: ModelConfig
    width: float
    latent_hw: tuple[int, int]
    bits: float
    weight_bytes: int | None = None
    package: Path | None = None
    function: str | None = None  # one function of a multifunction package
    kind: str = "denoiser"  # or the pipeline's text_encoder / decoder (export --pipeline)
    stats: GraphStats | None = None  # read off the package's program when there is no deploy graph to rebuild


def component_item(path: str, view) -> BenchItem:
    """A pipeline component's package (text encoder, decoder): analysed from its own MIL program."""
    if view.is_aimodel:
        raise EdgeCompileError(f"{path}: bench analyses a pipeline component from its MIL program, which a Core AI asset does not "
                               "hold: bench the Core ML export of the pipeline (export --pipeline), or the .aimodel denoiser alone")
    census = weight_census(view)
    return BenchItem(label=f"{Path(path).name} ({view.component})", config=None, width=1.0, latent_hw=(0, 0),
                     bits=census["average_bits"] or 16.0, weight_bytes=census["weight_bytes"], package=Path(path), kind=view.component,
                     stats=program_stats(view))


def pipeline_items(folder: str) -> list[BenchItem]:
    """The packages of an `export --pipeline` Resources folder, in the order an image runs them."""
    manifest = json.loads((Path(folder) / "pipeline.json").read_text())
    comps = manifest["components"]
    names = [*(comps["text_encoder"].get("chunks") or [comps["text_encoder"]["package"]]), comps["denoiser"]["package"], comps["decoder"]["package"]]
    return [item for name in names for item in package_items(str(Path(folder) / name))]


def package_items(path: str) -> list[BenchItem]:
    """One item per package, or per function of a multifunction package (one latent size each)."""
    if Path(path).is_dir() and (Path(path) / "pipeline.json").is_file():
        return pipeline_items(path)
    view = load_package(path)
    if view.meta is None and view.component:
        return [component_item(path, view)]
    view.require_meta("bench")
    views = [view] if not view.functions else [view.with_function(name) for name in view.functions]
    items = []
    for v in views:
        # a chunk stands for the denoiser it belongs to: weights of the whole chain, latency of the chain
        chain = load_chain(v)
        censuses = [weight_census(c) for c in chain]
        palettized = [(c["average_bits"], c["palettized_bytes"]) for c in censuses if c["average_bits"]]
        bits = sum(b * n for b, n in palettized) / sum(n for _, n in palettized) if palettized else 16.0
        label = Path(path).name if len(chain) == 1 else f"{chain[0].path.name} (+{len(chain) - 1} chunks)"
        label += f" [{v.function}]" if v.functions else ""
        items.append(BenchItem(label=label, config=ModelConfig.from_dict(v.config), width=v.width, latent_hw=v.latent_hw,
                               bits=bits, weight_bytes=sum(c["weight_bytes"] for c in censuses), package=Path(path),
                               function=v.function if v.functions else None))
    return items


def config_items(path: str, widths: str, latent: tuple[int, int] | None, bits: float) -> list[BenchItem]:
    config = ModelConfig.load(path)
    ws = config.parse_widths(widths)
    hw = latent or config.sample_size
    config.check_latent_size(*hw)
    return [BenchItem(label=f"{config.name} w{width_label(w)} {bits:g}-bit {hw[0]}x{hw[1]}", config=config, width=w,
                      latent_hw=tuple(hw), bits=bits) for w in ws]


@dataclass
class BenchRow:
    """One analysed item (a package, a function of one, or a config width): bench.json's `items` entries."""

    item: str
    package: str | None
    config: str  # the model's name, or the component's kind
    width: float
    latent: list[int]
    bits: float
    params: int
    weight_bytes: int
    static: dict  # the deploy graph's census (bench/static.py): macs per op class, ops, layout ops, largest tensor
    estimates_ms: dict[str, float]  # per device profile: the cost model's estimate of one denoiser call
    kind: str = "denoiser"
    host: dict | None = None  # measured torch latency on this host
    coreml: dict | None = None  # measured Core ML latency (macOS)
    coreai: dict | None = None  # measured Core AI runtime latency (an .aimodel, on this host)
    # one image: `steps` sampler steps, two denoiser calls each with guidance (a batch-1 package); the denoiser only
    # (the text encoder and decoder are not part of the package yet)
    per_image_ms: dict[str, float] = field(default_factory=dict)
    calls_per_image: int = 0
    device_memory_bytes: int = 0  # weights + the largest activation: what the device holds at the peak of one call

    @property
    def host_noisy(self) -> bool:
        """Host timings too spread to trust (another process competed): p10..p90 wider than NOISY_SPREAD of the median."""
        return bool(self.host) and (self.host["p90_ms"] - self.host["p10_ms"]) > NOISY_SPREAD * self.host["median_ms"]

    @property
    def total_macs(self) -> int:
        return self.static["total_macs"]

    @property
    def attention_fraction(self) -> float:
        return sum(v for k, v in self.static["macs"].items() if k.startswith("attn")) / max(self.total_macs, 1)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("host", "coreml", "coreai")}
        if self.coreai is not None:
            d["coreai"] = self.coreai
        if self.host is not None:
            d["host"] = {**self.host, "noisy": self.host_noisy}
        if self.coreml is not None:
            d["coreml"] = self.coreml
        return d


@dataclass
class BenchReport:
    """What `edgecompile bench` measured and estimated (bench.json is its to_dict)."""

    items: list[BenchRow]
    cost_model: dict  # per device profile: coefficients, calibration and validation against the paper's figures
    runs: list[dict] = field(default_factory=list)  # measured runs merged from other machines

    NOTE = "estimates_ms come from the cost model: they are estimates, not measurements"

    @property
    def devices(self) -> list[str]:
        return list(self.cost_model["devices"])

    @property
    def generation_ms(self) -> dict[str, float] | None:
        """One image through a whole pipeline (its three packages benched together): per device, the sum of each
        component's calls per image."""
        kinds = {r.kind for r in self.items}
        if not {"text_encoder", "denoiser", "decoder"} <= kinds:
            return None
        return {d: round(sum(r.per_image_ms[d] for r in self.items if r.kind in ("text_encoder", "denoiser", "decoder")), 3)
                for d in self.devices}

    @property
    def calibration_error_pct(self) -> float:
        return self.cost_model["calibration_error_pct"]

    @property
    def validation_error_pct(self) -> float:
        return self.cost_model["validation_error_pct"]

    def to_dict(self) -> dict:
        d = {"items": [r.to_dict() for r in self.items], "cost_model": self.cost_model, "note": self.NOTE, "runs": self.runs}
        if self.generation_ms is not None:
            d["generation_ms"] = self.generation_ms
        return d


NOISY_SPREAD = 0.25
DEFAULT_STEPS = 4  # the paper's app
DEFAULT_CFG_SCALE = 2.0


def analyse(items: list[BenchItem], devices=DEFAULT_DEVICES, host: bool = True, host_latent: tuple[int, int] | None = None,
            repeats: int = 10, progress=None, steps: int = DEFAULT_STEPS, cfg_scale: float = DEFAULT_CFG_SCALE) -> BenchReport:
    models = {d: calibrated(d) for d in devices}
    rows = []
    for i, item in enumerate(items):
        if progress:
            progress(f"analysing {item.label}", i, len(items))
        stats = item.stats or deploy_graph_stats(item.config, item.width, item.latent_hw)
        weight_bytes = item.weight_bytes if item.weight_bytes is not None else int(stats.params * item.bits / 8)
        row = BenchRow(item=item.label, package=str(item.package) if item.package else None,
                       config=item.config.name if item.config else item.kind, kind=item.kind,
                       width=item.width, latent=list(item.latent_hw), bits=round(item.bits, 3), params=stats.params,
                       weight_bytes=weight_bytes, static={k: v for k, v in stats.to_dict().items() if k != "params"},
                       estimates_ms={d: round(float(estimate_ms(stats, item.bits, m["coefficients"], m["profile"].memory_gbps)), 3)
                                     for d, m in models.items()})
        guided = 2 if cfg_scale != 1.0 else 1
        # per image: the denoiser every step (twice with guidance), the text encoder once per prompt (and once for the
        # empty prompt with guidance), the decoder once
        row.calls_per_image = {"denoiser": steps * guided, "text_encoder": guided}.get(item.kind, 1)
        row.per_image_ms = {d: round(v * row.calls_per_image, 3) for d, v in row.estimates_ms.items()}
        row.device_memory_bytes = int(weight_bytes + stats.largest_tensor_bytes)
        if host and item.config is not None:
            hw = host_latent if host_latent and item.package is None else item.latent_hw
            row.host = {**torch_latency(item.config, item.width, tuple(hw), repeats=repeats), "latent": list(hw)}
        if item.package is not None and item.package.suffix == ".aimodel":
            row.coreai = coreai_latency(item.package, repeats, function=item.function)
        elif item.package is not None:
            row.coreml = coreml_latency(item.package, repeats, function=item.function)
        rows.append(row)
    cost = {}
    for d, m in models.items():
        c = m["coefficients"]
        cost[d] = {"device": m["profile"].name, "derivation": m["derivation"],
                   "coefficients": {"matrix_gmacs": c.matrix_gmacs, "attention_gmacs": c.attention_gmacs,
                                    "op_overhead_us": c.op_overhead_us, "vector_ratio": c.vector_ratio},
                   "memory_gbps": m["profile"].memory_gbps, "calibration": m["calibration"], "validation": m["validation"],
                   "calibration_error_pct": m["calibration_error_pct"], "validation_error_pct": m["validation_error_pct"]}
    primary = cost[devices[0]]
    return BenchReport(items=rows, cost_model={"calibration_error_pct": primary["calibration_error_pct"],
                                               "validation_error_pct": primary["validation_error_pct"], "devices": cost})


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(data: dict, export_reports: list[ExportReport]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    items = data["items"]
    if len(items) > 1:  # one bar compares nothing
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.5))
        devices = list(data["cost_model"]["devices"])
        for j, d in enumerate(devices):
            ax.barh([i + 0.4 * j for i in range(len(items))], [r["estimates_ms"][d] for r in items], height=0.4, label=f"{d} (estimate)")
        ax.set_yticks([i + 0.2 for i in range(len(items))], [r["item"] for r in items], fontsize=8)
        ax.set_xlabel("estimated latency per denoising step (ms)")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
        out["latency_per_item.png"] = _png(fig)
        plt.close(fig)
    cm = data["cost_model"]["devices"][next(iter(data["cost_model"]["devices"]))]
    rows = cm["calibration"] + cm["validation"]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["paper_ms"] for r in rows], width=0.4, label="paper (iPhone 16 Pro Max)")
        ax.bar([i + 0.2 for i in x], [r["estimate_ms"] for r in rows], width=0.4, label="edgecompile estimate")
        ax.set_xticks(list(x), [r["model"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.axvline(len(cm["calibration"]) - 0.5, color="grey", linestyle=":")
        ax.set_ylabel("ms per step")
        ax.set_title("calibration (left of the line) and validation without refit (right)", fontsize=9)
        ax.legend(fontsize=8)
        out["estimate_vs_paper.png"] = _png(fig)
        plt.close(fig)
    pts = [(r.size_bytes / 2**20, r.verify.psnr_vs_checkpoint_db, f"w{width_label(r.width)} {r.bits}") for r in export_reports if r.verify]
    if len(pts) > 1:  # a trade-off needs two points
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for sx, sy, lab in pts:
            ax.annotate(lab, (sx, sy), fontsize=7)
        ax.set_xlabel("package size (MiB)")
        ax.set_ylabel("PSNR vs checkpoint (dB)")
        out["psnr_vs_size.png"] = _png(fig)
        plt.close(fig)
    return out


def markdown(data: dict) -> str:
    lines = ["# edgecompile latency report", "", "Estimates come from the device cost model and are labelled as such; "
             "host latency is measured here.", "", "## Packages and configs", "",
             "| item | params | weight MiB | GMACs/step | " + " | ".join(f"{c} %" for c in OP_CLASSES) + " | ops | layout ops | largest tensor MiB | "
             + " | ".join(f"estimate {d} ms" for d in data["cost_model"]["devices"]) + " | host median ms (latent) |",
             "|" + "---|" * (8 + len(OP_CLASSES) + len(data["cost_model"]["devices"]))]
    for r in data["items"]:
        s = r["static"]
        total = max(s["total_macs"], 1)
        host = f"{r['host']['median_ms']:.1f} ({r['host']['latent'][0]}x{r['host']['latent'][1]}, {r['host']['runtime']})" if "host" in r else "-"
        lines.append(f"| {r['item']} | {r['params'] / 1e6:.1f} M | {r['weight_bytes'] / 2**20:.1f} | {s['total_macs'] / 1e9:.1f} | "
                     + " | ".join(f"{100 * s['macs'][c] / total:.1f}" for c in OP_CLASSES)
                     + f" | {s['ops']} | {s['layout_ops']} | {s['largest_tensor_bytes'] / 2**20:.1f} | "
                     + " | ".join(f"{v:.1f}" for v in r["estimates_ms"].values()) + f" | {host} |")
    for cm in data["cost_model"]["devices"].values():
        lines += ["", f"## Cost model: {cm['device']} ({cm['derivation']})", "",
                  f"Coefficients: matrix {cm['coefficients']['matrix_gmacs']:.0f} GMAC/s, attention {cm['coefficients']['attention_gmacs']:.0f} GMAC/s, "
                  f"{cm['coefficients']['op_overhead_us']:.2f} us per op, memory {cm['memory_gbps']} GB/s."]
        if cm["calibration"]:
            lines += ["", f"Worst calibration error {cm['calibration_error_pct']}%, worst validation error {cm['validation_error_pct']}% (goal: 25%).", "",
                      "| set | model | paper ms | estimate ms | error % |", "|---|---|---|---|---|"]
            lines += [f"| calibration | {r['model']} | {r['paper_ms']} | {r['estimate_ms']} | {r['error_pct']} |" for r in cm["calibration"]]
            lines += [f"| validation | {r['model']} | {r['paper_ms']} | {r['estimate_ms']} | {r['error_pct']} |" for r in cm["validation"]]
    runs = data.get("runs") or []
    if runs:
        lines += ["", "## Measured runs merged from other machines", "",
                  "| device | package | compute units | median ms | p10 | p90 |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['device']} | {r.get('package', '')} | {r.get('compute_units', '')} | {r['median_ms']} | "
                  f"{r.get('p10_ms', '')} | {r.get('p90_ms', '')} |" for r in runs]
    return "\n".join(lines) + "\n"


def write_report(report: BenchReport, out_dir: Path, export_reports: list[ExportReport], force: bool = False, inputs=()) -> None:
    data = report.to_dict()
    images = plots(data, export_reports)
    for r in export_reports:  # what each package draws (export's verify stage), beside the checkpoint's samples
        for grid in r.sample_grids():
            images[f"samples_{Path(r.package).stem}{grid.stem.removeprefix('samples')}.png"] = grid.read_bytes()
    md = markdown(data)
    with atomic_path(out_dir, force=force, inputs=inputs) as tmp:
        (tmp / "bench.json").write_text(dumps(data) + "\n")
        for name, png in images.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.md").write_text(md + "".join(f"\n![{n}]({n})\n" for n in images))
        body = "".join(f'<h3>{n}</h3><img src="data:image/png;base64,{base64.b64encode(png).decode()}">' for n, png in images.items())
        html_md = md.replace("&", "&amp;").replace("<", "&lt;")
        (tmp / "report.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>edgecompile latency report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{white-space:pre-wrap;font-size:12px}</style>"
            f"</head><body><pre>{html_md}</pre>{body}</body></html>\n")


@dataclass
class BenchOptions:
    packages: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    config_widths: str = "all"
    latent: tuple[int, int] | None = None
    config_bits: float = 16.0
    devices: tuple[str, ...] = DEFAULT_DEVICES
    runs: list[str] = field(default_factory=list)  # measured runs from other machines (bench/latency.py format)
    export_reports: list[str] = field(default_factory=list)  # report.json files, for the PSNR-vs-size plot
    host: bool = True
    host_latent: tuple[int, int] | None = None
    repeats: int = 10
    steps: int = DEFAULT_STEPS  # the per-image estimate: sampler steps
    cfg_scale: float = DEFAULT_CFG_SCALE  # and guidance (two calls per step unless 1)
    output: Path | None = None
    force: bool = False

    @property
    def inputs(self) -> list[str]:
        """Everything the report folder must never be, contain or lie inside."""
        return [*self.packages, *self.configs, *self.runs, *self.export_reports]


@dataclass
class BenchInputs:
    """What BenchOptions name, read and checked before any measurement."""

    items: list[BenchItem]
    runs: list[dict]
    export_reports: list[ExportReport]


def resolve_bench(opts: BenchOptions) -> BenchInputs:
    if not opts.packages and not opts.configs:
        raise EdgeCompileError("give one or more packages (PKG...) or --config files to benchmark")
    if opts.output:
        check_output_path(Path(opts.output), opts.force, inputs=opts.inputs)
    for d in opts.devices:  # device profiles are inputs too: read and checked before any measurement
        find_profile(d)
    items = [item for p in opts.packages for item in package_items(p)]
    for c in opts.configs:
        items += config_items(c, opts.config_widths, opts.latent, opts.config_bits)
    return BenchInputs(items=items, runs=load_runs(list(opts.runs)), export_reports=[ExportReport.read(r) for r in opts.export_reports])


def run_bench(opts: BenchOptions, inputs: BenchInputs | None = None, progress=None) -> BenchReport:
    """`edgecompile bench`: static analysis, host and Core ML timing, cost-model estimates; the report folder
    written when `output` is set. `inputs` from resolve_bench (called here when not given)."""
    inputs = inputs or resolve_bench(opts)
    data = analyse(inputs.items, tuple(opts.devices) or DEFAULT_DEVICES, host=opts.host, host_latent=opts.host_latent,
                   repeats=opts.repeats, progress=progress, steps=opts.steps, cfg_scale=opts.cfg_scale)
    data.runs = inputs.runs
    if opts.output:
        write_report(data, Path(opts.output), inputs.export_reports, force=opts.force, inputs=opts.inputs)
    return data

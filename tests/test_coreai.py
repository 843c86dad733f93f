"""The Core AI target (issue 27): `--format aimodel` from the same deploy graph, edgecompile's LUTs inside bit for
bit, verified by Apple's own runtime on Linux, and that runtime as the oracle for the MIL interpreter. Tiny
configs; each conversion is done once per module."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("coreai_torch")
pytest.importorskip("coreai.runtime")

from edgecompile.coreai.convert import convert_to_aimodel  # noqa: E402
from edgecompile.coreai.runtime import AIModelRunner, asset_luts  # noqa: E402
from edgecompile.coreml.package import load_package, weight_census  # noqa: E402
from edgecompile.deploy.contract import OUTPUT, example_inputs, input_names  # noqa: E402
from edgecompile.errors import EdgeCompileError  # noqa: E402
from edgecompile.metrics import psnr_db  # noqa: E402
from tests.conftest import TINY, trained_like  # noqa: E402
from tests.test_coreml import run_cli  # noqa: E402
from tests.test_robustness import one_line_exit_2  # noqa: E402


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint at 4 bits as a Core AI asset, 8x8 and 8x12 as two entrypoints (a Core ML package of the
    same export holds the same palettes: its LUTs decode to palettes.safetensors, tests/test_palettized_export.py)."""
    from edgecompile.commands.options import CompressionOptions, LatentPlan, PackageOptions
    from edgecompile.export import ExportOptions, run_export
    from edgecompile.model.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("coreai")
    ckpt = load_checkpoint(tiny_checkpoint)
    reports = {}
    opts = ExportOptions(output=out / "aimodel", widths=[1.0], latents=LatentPlan(package=(8, 8), more=((8, 12),)),
                         compression=CompressionOptions(bits="4", distill_steps=4), package=PackageOptions(fmt="aimodel"))
    reports["aimodel"] = run_export(ckpt, opts)[0]
    return out, reports, str(tiny_checkpoint)


def test_aimodel_export_is_verified_by_core_ais_runtime(exports, capsys):
    out, reports, ckpt = exports
    report = reports["aimodel"]
    asset = out / "aimodel" / "w1.0" / "tiny_w1.0_4bit.aimodel"
    assert asset.is_dir() and not any(p.name.endswith(".mlpackage") for p in asset.parent.iterdir())
    assert report.verify.passed and report.verify.runtime == "coreai-runtime" and report.verify.psnr_db >= 60
    # fp16 compute, as the Core ML package's: gated against the same graph in torch's fp16, its cost against the
    # fp32 checkpoint reported
    assert report.verify.precision == "fp16" and "fp16" in report.verify.reference
    assert np.isfinite(report.verify.psnr_vs_checkpoint_db) and report.verify.psnr_vs_checkpoint_db < report.verify.psnr_db
    assert [(f.name, f.latent, f.verify.passed) for f in report.functions] == [("latent_8x8", [8, 8], True), ("latent_8x12", [8, 12], True)]
    assert load_package(asset, function="latent_8x12").inputs[0]["shape"] == [1, 1, 8, 12]  # one asset, an entrypoint per size
    view = load_package(asset)
    assert view.is_aimodel and view.meta.width == 1.0 and view.bits.value == "4"
    assert [f["name"] for f in view.inputs] == input_names(TINY) and [f["name"] for f in view.outputs] == [OUTPUT]
    assert view.ops.get("lut_to_dense", 0) >= 1  # palettized weights stay LUTs in the program
    assert view.meta.compute == "float16" and "float16" in weight_census(view)["weight_dtypes"]
    code, stdout, err = run_cli(["verify", str(asset), "--checkpoint", ckpt, "--json"], capsys)
    assert code == 0, err
    results = json.loads(stdout)["functions"]  # one result per entrypoint
    assert [r["function"] for r in results] == ["latent_8x8", "latent_8x12"]
    assert all(r["passed"] and r["runtime"] == "coreai-runtime" and r["psnr_db"] >= 60 for r in results)
    code, stdout, err = run_cli(["inspect", str(asset)], capsys)
    assert code == 0, err
    assert "latent_image_embeddings" in stdout and OUTPUT in stdout
    code, stdout, err = run_cli(["bench", str(asset), "--repeats", "1", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(stdout)["items"]
    assert [r["latent"] for r in rows] == [[8, 8], [8, 12]] and all(r["coreai"]["median_ms"] > 0 for r in rows)


def test_core_ai_chunks_carry_the_same_tensors_and_verify_as_a_chain(tiny_checkpoint, tmp_path, capsys):
    """--chunks with --format aimodel: the fp16 graph with its LUTs cut where Core ML's chunks are, each chunk an
    asset with Float32 at its boundary; verified as a chain and each chunk alone by Core AI's runtime; every palette
    is in exactly one chunk, the timestep's layers (top-level modules of the graph) included."""
    from edgecompile.compress.sidecars import load_palettes

    code, stdout, err = run_cli(["export", str(tiny_checkpoint), "--width", "1.0", "--bits", "4", "--chunks", "2", "--format", "aimodel",
                                 "--distill-steps", "2", "--no-generate", "-o", str(tmp_path / "o"), "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)["packages"][0]
    names = [c["package"] for c in report["chunks"]]
    assert names == ["tiny_w1.0_4bit_chunk1.aimodel", "tiny_w1.0_4bit_chunk2.aimodel"]
    assert report["verify"]["passed"] and len(report["verify"]["chunk_psnr_db"]) == 2 and min(report["verify"]["chunk_psnr_db"]) >= 60
    folder = tmp_path / "o" / "w1.0"
    palettes = load_palettes(folder / "palettes.safetensors")
    luts = [lut for name in names for lut in asset_luts(folder / name)]
    assert len(luts) == len(palettes) and any(n.startswith("t_mlp") for n in palettes)
    assert load_package(folder / names[1]).inputs[0]["dtype"] == "float32"  # carried tensors cross as Float32
    code, out, err = run_cli(["verify", str(folder / names[1]), "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 0 and "chain of 2 chunks" in out, err


def test_the_assets_luts_are_edgecompiles_palettes_bit_for_bit(exports):
    from edgecompile.compress.sidecars import load_palettes

    out, _, _ = exports
    palettes = load_palettes(out / "aimodel" / "w1.0" / "palettes.safetensors")
    luts = asset_luts(out / "aimodel" / "w1.0" / "tiny_w1.0_4bit.aimodel")
    assert len(palettes) >= 1 and len(luts) % len(palettes) == 0  # each entrypoint (latent size) holds every LUT
    unmatched = set(palettes)
    for lut, indices in luts:  # each LUT of the program is one of the palettes, LUT bits and indices equal
        hit = next(name for name, p in palettes.items() if p.lut.shape == lut.shape and np.array_equal(p.lut.view(np.uint16), lut.view(np.uint16))
                   and np.array_equal(p.indices, indices))
        unmatched.discard(hit)
    assert not unmatched


def test_core_ais_runtime_is_the_interpreters_oracle(tmp_path):
    """The same graph and weights (fp16 values, as a Core ML package stores them) as an fp32 Core ML program run by
    the MIL interpreter and as an .aimodel run by Apple's runtime: the two agree far past the verification bar."""
    from edgecompile.coreml.convert import convert_graph
    from edgecompile.coreml.interpreter import MILInterpreter
    from edgecompile.coreml.verify import package_feeds, verification_inputs
    from edgecompile.deploy.rewrite import deploy_model

    graph = deploy_model(trained_like(TINY), 1.0).eval()
    with torch.no_grad():
        for t in [*graph.parameters(), *graph.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().float())
    example = example_inputs(graph)
    convert_graph(graph, example, input_names(TINY), [OUTPUT], compute_precision="float32").save(str(tmp_path / "g.mlpackage"))
    convert_to_aimodel(graph, example, input_names(TINY), [OUTPUT], tmp_path / "g.aimodel", {})
    interpreter = MILInterpreter(load_package(tmp_path / "g.mlpackage").program, precision="fp32").run
    runtime = AIModelRunner(tmp_path / "g.aimodel")
    for inputs in verification_inputs(TINY, (8, 8)):
        feeds = package_feeds(*inputs)
        assert psnr_db(runtime(feeds)[OUTPUT], interpreter(feeds)[OUTPUT]) > 110


def test_an_fp16_graph_keeps_the_timestep_features_in_fp32():
    """float16_compute computes the sinusoidal timestep features in fp32 and casts them to fp16 at the first layer:
    t_mlp1 reads exactly the fp32 features rounded to fp16. Without the island (everything fp16), t * 1000 * f is
    rounded first and the features differ."""
    from edgecompile.coreai.convert import DENOISER_FP16, float16_compute
    from edgecompile.deploy.rewrite import deploy_model

    graph = deploy_model(trained_like(TINY), 1.0).eval()
    seen = {}

    def hook(name):
        return lambda module, args: seen.__setitem__(name, args[0].detach().clone())

    island = float16_compute(graph, input_names(TINY), DENOISER_FP16.fp32_inputs, DENOISER_FP16.fp32_buffers)
    everything = float16_compute(graph, input_names(TINY))
    graph.t_mlp1.register_forward_pre_hook(hook("fp32"))
    island.model.t_mlp1.register_forward_pre_hook(hook("island"))
    everything.model.t_mlp1.register_forward_pre_hook(hook("fp16"))
    latent, _, text = example_inputs(graph)
    t = torch.tensor([0.85])
    with torch.no_grad():
        for g in (graph, island, everything):
            assert g(latent, t, text).dtype == torch.float32  # Float32 at the boundary, whatever it computes in
    assert seen["island"].dtype == torch.float16 and torch.equal(seen["island"], seen["fp32"].half())
    assert not torch.equal(seen["fp16"], seen["fp32"].half())


def test_a_denoiser_whose_fp16_asset_misses_the_bar_is_converted_in_fp32(tmp_path):
    """convert_denoiser keeps the fp16 asset where Core AI's runtime holds it to the bar against torch's fp16 run of
    the graph, and converts again in fp32 (saying so in the metadata) where it does not: here a bar no fp16 reaches."""
    from edgecompile.coreai.denoiser import convert_denoiser
    from edgecompile.coreai.runtime import read_asset
    from edgecompile.coreml.verify import verification_inputs
    from edgecompile.deploy.metadata import COMPUTE
    from edgecompile.deploy.rewrite import deploy_model

    graph = deploy_model(trained_like(TINY), 1.0).eval()
    checks = {"main": verification_inputs(TINY, tuple(graph.latent_hw))}
    for bar, compute in ((60.0, "float16"), (200.0, "float32")):
        path = tmp_path / f"bar{bar:g}.aimodel"
        convert_denoiser(graph, example_inputs(graph), input_names(TINY), [OUTPUT], path, {"edgecompile.version": "test"}, None, None,
                         checks, bar)
        assert read_asset(path)[2][COMPUTE] == compute
        runner = AIModelRunner(path)
        feeds = {n: a.numpy() for n, a in zip(input_names(TINY), checks["main"][0])}
        with torch.no_grad():
            want = graph(*checks["main"][0]).numpy()
        assert psnr_db(want, runner(feeds)[OUTPUT]) > (100 if compute == "float32" else 55)
        runner.close()


def test_a_changed_asset_fails_verification_naming_the_file(exports, tmp_path, capsys):
    out, _, ckpt = exports
    copy = tmp_path / "w1.0"
    shutil.copytree(out / "aimodel" / "w1.0", copy)
    program = copy / "tiny_w1.0_4bit.aimodel" / "main.mlirb"
    data = bytearray(program.read_bytes())
    data[-100] ^= 0x01
    program.write_bytes(bytes(data))
    code, _, err = run_cli(["verify", str(copy / "tiny_w1.0_4bit.aimodel"), "--checkpoint", ckpt], capsys)
    assert code == 1 and "main.mlirb" in err, err


class _Spectral(torch.nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x).abs()


class _WithSpectral(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.spectrum = _Spectral()

    def forward(self, x):
        return self.spectrum(x)


def test_bad_assets_and_unconvertible_ops_are_one_line(tmp_path, capsys):
    with pytest.raises(EdgeCompileError, match=r"Core AI cannot convert aten\._fft_r2c.* in layer spectrum"):
        convert_to_aimodel(_WithSpectral(), (torch.randn(1, 2, 4, 4),), ["x"], ["y"], tmp_path / "odd.aimodel", {})
    assert not (tmp_path / "odd.aimodel").exists()
    foreign = tmp_path / "foreign.aimodel"
    convert_to_aimodel(torch.nn.Conv2d(2, 2, 1), (torch.randn(1, 2, 4, 4),), ["x"], ["y"], foreign, {})
    code, _, err = run_cli(["verify", str(foreign)], capsys)
    one_line_exit_2(code, err, "has no edgecompile metadata")
    fake = tmp_path / "fake.aimodel"
    fake.mkdir()
    (fake / "metadata.json").write_text("{}")
    code, _, err = run_cli(["inspect", str(fake)], capsys)
    one_line_exit_2(code, err, "is not a Core AI asset")


def test_the_whole_pipeline_as_core_ai_assets_draws_from_text(tmp_path, capsys):
    """--pipeline --format aimodel: text encoder, denoiser and decoder as .aimodel assets, each verified by Core AI's
    runtime, and prompt -> picture through them all, against diffusers' own PixArt pipeline from the same noise."""
    from tests.test_components import T, tiny_pipeline

    from edgecompile.model.importers import import_checkpoint

    tiny_pipeline(tmp_path / "src")
    import_checkpoint(tmp_path / "src", tmp_path / "ckpt", text_len=T)
    capsys.readouterr()
    code, stdout, err = run_cli(["export", str(tmp_path / "ckpt"), "--pipeline", "--format", "aimodel", "-o", str(tmp_path / "o"), "--json"],
                                capsys)
    assert code == 0, err
    report = json.loads(stdout)["packages"][0]
    res = tmp_path / "o" / "w1.0" / "Resources"
    assert {p.name for p in res.iterdir()} >= {"TextEncoder.aimodel", "MultiModalDiffusionTransformer.aimodel", "VAEDecoder.aimodel",
                                              "tokenizer.json", "pipeline.json"}
    # fp16 compute where it holds the gate against the fp32 torch graph, as Core ML's components
    assert all(c["verify"]["passed"] and c["verify"]["runtime"] == "coreai-runtime (fp16)" for c in report["components"])
    code, stdout, err = run_cli(["sample", str(res), "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "a red fox", "--compare",
                                 "-o", str(tmp_path / "fox.npy"), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["runtime"] == "coreai-runtime" and summary["reference"] == "diffusers' PixArtSigmaPipeline"
    assert summary["final_image_psnr_db"] >= 35, summary  # fp16 assets, as the Core ML pipeline's bar (test_components)


class _Energy(torch.nn.Module):
    """A component whose intermediate squares pass fp16's range (65504) while its output does not."""

    input_names, output_names = ("z",), ("energy",)

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(4, 8, 1)
        with torch.no_grad():
            self.proj.weight.mul_(400.0)

    def forward(self, z):
        h = self.proj(z)
        return (h * h).mean(dim=1, keepdim=True) / 1e4


def test_a_component_that_overflows_fp16_computes_in_fp32_in_core_ai():
    """fp16 first; a component whose fp16 asset overflows (measured by Core AI's runtime, kept in the result) computes
    in fp32 and verifies. (The SDXL-like decoder of test_components, whose group norms overflow Core ML's fp16,
    stays finite in Core AI's fp16 group_norm: it verifies in fp16 here.)"""
    from tests.test_components import vae_kl

    from edgecompile.coreml.component import convert_for_core_ai
    from edgecompile.deploy.vae import VAEDecoderGraph

    inputs = [(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)),) for s in range(2)]
    _, ok = convert_for_core_ai(VAEDecoderGraph(vae_kl(amplify=8.0), (8, 8)), "decoder", inputs)
    assert ok.passed and ok.runtime == "coreai-runtime (fp16)" and not ok.fp32_everywhere, ok.to_dict()
    _, fixed = convert_for_core_ai(_Energy().eval(), "decoder", inputs)
    assert fixed.fp32_everywhere and fixed.runtime == "coreai-runtime (fp32)" and fixed.passed, fixed.to_dict()
    assert fixed.non_finite_without_islands > 0 or fixed.psnr_without_islands_db < 40, fixed.to_dict()

"""--chunks N: the denoiser cut at block boundaries into packages that run one after another."""

import json
import shutil

import numpy as np
import pytest
import torch

from edgecompile.coreml.interpreter import MILInterpreter
from edgecompile.coreml.package import load_chain, load_package
from edgecompile.coreml.swift import CONTRACT
from edgecompile.deploy.chunks import chunk_boundaries, chunk_example, split_deploy
from edgecompile.deploy.contract import LATENT, OUTPUT, TEXT, TIMESTEP, example_inputs
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.export import CompressionOptions, ExportOptions, PackageOptions, VerificationOptions, run_export
from edgecompile.metrics import psnr_db
from edgecompile.model.checkpoint import load_checkpoint
from tests.conftest import CONFIGS, trained_like
from tests.test_coreml import run_cli


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_cut_of_every_config_computes_the_whole_graph_exactly(name):
    deploy = deploy_model(trained_like(CONFIGS[name]), 1.0).eval()
    example = example_inputs(deploy, batch=2)
    with torch.no_grad():
        whole = deploy(*example)
    for n in range(2, deploy.n_blocks + 1):
        chunks, io = split_deploy(deploy, n, example)
        assert [(c.start, c.end) for c in chunks] == chunk_boundaries(deploy, n)
        assert chunks[0].start == 0 and chunks[-1].end == deploy.n_blocks
        assert all(a.end == b.start and a.end > a.start for a, b in zip(chunks, chunks[1:]))
        produced = {LATENT, TIMESTEP, TEXT}
        for names in io:
            assert not set(names.inputs) & set(names.outputs)  # a program cannot use one name both ways
            assert set(names.inputs) <= produced, "every input is a package input or an earlier chunk's output"
            assert len(set(names.outputs)) == len(names.outputs) and not set(names.outputs) & produced
            produced |= set(names.outputs)
        assert io[-1].outputs == [OUTPUT]
        args = chunk_example(chunks, io, example)
        for chunk, chunk_args in zip(chunks[:-1], args):
            with torch.no_grad():
                outputs = chunk(*chunk_args)
            # an input returned as an output would be one program variable under two names (Core ML refuses it)
            assert not any(o is a for o in outputs for a in chunk_args), f"{name}, {n} chunks"
        last_args = args[-1]
        with torch.no_grad():
            assert torch.equal(chunks[-1](*last_args), whole), f"{name}, {n} chunks"


def test_cuts_balance_weights():
    deploy = deploy_model(trained_like(CONFIGS["toy"]), 1.0)
    sizes = []
    for start, end in chunk_boundaries(deploy, 3):
        sizes.append(sum(p.numel() for stage, i in map(deploy.block_at, range(start, end))
                         for p in getattr(deploy, stage)[i].parameters()))
    assert max(sizes) < 2 * min(sizes)


@pytest.fixture(scope="module")
def chunked(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint at 4 bits in 3 chunks, laid out as Swift resources."""
    out = tmp_path_factory.mktemp("chunks")
    ckpt = load_checkpoint(tiny_checkpoint)
    [report] = run_export(ckpt, ExportOptions(output=out, widths=[1.0], compression=CompressionOptions(bits="4", distill=False),
        package=PackageOptions(chunks=3, swift_resources=True)))
    return report, out / "w1.0"


def test_chunked_export_is_verified_chunk_by_chunk_and_as_a_chain(chunked):
    report, folder = chunked
    assert [c.package for c in report.chunks] == [f"MultiModalDiffusionTransformerChunk{k}.mlpackage" for k in (1, 2, 3)]
    assert report.package == "Resources/MultiModalDiffusionTransformerChunk1.mlpackage"
    assert report.verify.passed and len(report.verify.chunk_psnr_db) == 3
    assert min(report.verify.chunk_psnr_db) >= 60 and report.verify.psnr_db >= 60
    assert report.size_bytes == sum(c.size_bytes for c in report.chunks)
    saved = json.loads((folder / "report.json").read_text())
    assert [c["blocks"] for c in saved["chunks"]] == [c.blocks for c in report.chunks]


def test_each_layer_is_palettized_in_exactly_one_chunk(chunked):
    report, folder = chunked
    chain = load_chain(load_package(folder / report.package))
    assert [v.chunk for v in chain] == [(1, 3), (2, 3), (3, 3)]
    luts = [o.outputs[0].name for v in chain for o in v.main.operations if o.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == len(set(luts)) == len(report.compression.bits_per_layer)


def test_the_chain_equals_the_unchunked_package(chunked, tiny_checkpoint, tmp_path):
    report, folder = chunked
    [whole] = run_export(load_checkpoint(tiny_checkpoint), ExportOptions(
        output=tmp_path, widths=[1.0], compression=CompressionOptions(bits="4", distill=False), verification=VerificationOptions(verify=False)))
    view = load_package(whole.path)
    feeds = {f["name"]: np.random.default_rng(0).standard_normal(f["shape"]).astype(np.float32) for f in view.inputs}
    feeds[TIMESTEP] = np.array([0.4], np.float32)
    want = MILInterpreter(view.program).run(feeds)[OUTPUT]
    values = dict(feeds)
    for v in load_chain(load_package(folder / report.package)):
        values.update(MILInterpreter(v.program).run({f["name"]: values[f["name"]] for f in v.inputs}))
    assert psnr_db(want, values[OUTPUT]) > 70


def test_swift_contract_lists_the_chunks_and_their_bindings(chunked):
    report, folder = chunked
    contract = json.loads((folder / "Resources" / CONTRACT).read_text())
    models = contract["chunks"]["models"]
    assert [m["model"] for m in models] == [f"MultiModalDiffusionTransformerChunk{k}" for k in (1, 2, 3)]
    assert list(models[0]["inputs"]) == [LATENT, TIMESTEP, TEXT] and list(models[-1]["outputs"]) == [OUTPUT]
    script = (folder / "Resources" / "compile_resources.sh").read_text()
    assert all(f"MultiModalDiffusionTransformerChunk{k}.mlpackage" in script for k in (1, 2, 3))


def test_verify_command_runs_the_chain_from_any_chunk(chunked, tiny_checkpoint, capsys):
    report, folder = chunked
    code, out, _ = run_cli(["verify", str(folder / "Resources" / report.chunks[1].package), "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 0 and "chain of 3 chunks" in out and "chunks alone" in out


def test_verification_runs_the_first_chunk_once_per_input(chunked, tiny_checkpoint, monkeypatch):
    """The first chunk alone is fed the package inputs, as in the chain: its chain outputs are its check alone, so
    verification runs it once per input, and each later chunk twice (the chain, and alone on the reference's
    tensors). The chunk PSNRs are those of running every chunk again."""
    from edgecompile.coreml import verify as verify_module
    from edgecompile.commands.verify import verify_exported

    report, folder = chunked
    runs: dict[str, int] = {}
    real_run = MILInterpreter.run

    def counting_run(self, inputs):
        key = next(iter(self.function.outputs)).name  # each chunk's first output names it
        runs[key] = runs.get(key, 0) + 1
        return real_run(self, inputs)

    monkeypatch.setattr(MILInterpreter, "run", counting_run)
    result = verify_exported(folder / report.package, tiny_checkpoint, runtime="interpreter")
    n = verify_module.N_VERIFY_INPUTS
    assert sorted(runs.values()) == [n, 2 * n, 2 * n]
    monkeypatch.setattr(MILInterpreter, "run", real_run)
    views = load_chain(load_package(folder / report.package))
    ckpt = load_checkpoint(tiny_checkpoint)
    from edgecompile.compress.simulate import simulated_model_for_package

    inputs = verify_module.verification_inputs(ckpt.config, views[0].latent_hw, ckpt=ckpt, width=views[0].width)
    again = verify_module.verify_chunks(views, simulated_model_for_package(views[0], ckpt, torch.device("cpu")), inputs, "fp32",
                                        "interpreter", "cpu")
    assert again == result.chunk_psnr_db


def test_a_missing_chunk_is_a_one_line_error(chunked, tiny_checkpoint, tmp_path, capsys):
    report, folder = chunked
    copy = tmp_path / "w"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "Resources" / report.chunks[2].package)
    code, out, err = run_cli(["verify", str(copy / report.package), "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 2 and "keep every chunk beside it" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--chunks", "9"], "use 1 to 4 chunks"),
    (["--chunks", "2", "--format", "onnx"], "drop --format onnx"),
    (["--chunks", "0"], "--chunks"),
])
def test_bad_chunk_options_exit_2_and_write_nothing(tiny_checkpoint, tmp_path, capsys, args, message):
    code, _, err = run_cli(["export", str(tiny_checkpoint), "-o", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

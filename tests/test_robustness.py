"""Nothing lost, nothing unverified ships: one case per promise of the README's "Safety and verification" section.
Fast: unit calls where they prove the point, a full (tiny) export only where the pipeline itself is the subject."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecompile.atomic import OutputLock, atomic_outputs, atomic_path, interrupts_deferred, safe_name, termination_as_interrupt
from edgecompile.errors import EdgeCompileError
from edgecompile.model.checkpoint import load_checkpoint, save_checkpoint
from edgecompile.model.config import ModelConfig
from tests.conftest import TINY, trained_like
from tests.test_coreml import package_path, run_cli


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


PROGRESS_LINE = re.compile(r"^edgecompile: \[\d+:\d\d(:\d\d)?\] ")  # plain progress lines off a terminal (commands/progress.py)


def one_line_exit_2(code, err, *needles):
    """Exit 2 and one line saying what is wrong (after any progress lines of stages that had started)."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


# ---- 1. outputs: never over or inside an input, never a user's folder, atomic, locked, cleaned ------------------------
def test_bench_output_refuses_a_user_folder_and_the_current_folder(tmp_path, monkeypatch, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    for extra in ([], ["--force"]):
        code, _, err = run_cli(["bench", "--config", "recipes/toy.yaml", "--no-host", "-o", str(user), *extra], capsys)
        one_line_exit_2(code, err)
        assert tree(user) == {"notes.txt": b"keep"}
    monkeypatch.chdir(user)
    code, _, err = run_cli(["init", str(Path(__file__).parents[1] / "recipes" / "toy.yaml"), "-o", ".", "--force"], capsys)
    one_line_exit_2(code, err, "folder you are in")
    assert tree(user) == {"notes.txt": b"keep"}


def test_export_never_writes_over_or_inside_its_input(tiny_checkpoint, tmp_path, capsys):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_checkpoint, parent / "w0.5")
    before = tree(parent)
    code, _, err = run_cli(["export", str(parent / "w0.5"), "--width", "0.5", "-o", str(parent), "--force"], capsys)
    one_line_exit_2(code, err, "input")
    code, _, err = run_cli(["export", str(parent / "w0.5"), "--width", "0.5", "-o", str(parent / "w0.5" / "inner")], capsys)
    one_line_exit_2(code, err, "input")
    assert tree(parent) == before


def test_a_model_name_is_a_name_not_a_path():
    from edgecompile.export import package_name

    name = package_name("../../../X", 0.5, "16", "coreml")
    assert "/" not in name and not name.startswith(".") and name.endswith("_w0.5_fp16.mlpackage")
    assert safe_name("..") == "model" and safe_name("a b/c") == "a_b_c"


def test_force_replaces_atomically_and_a_failure_keeps_the_old_output(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    with atomic_path(dest) as tmp:
        (tmp / "report.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest, force=True) as tmp:
        (tmp / "report.json").write_text("new")
        raise RuntimeError("a stage failed")
    assert tree(dest) == {"report.json": b"old"}
    # the old output cannot be deleted: the new one is in place all the same, the old one set aside and reported
    import edgecompile.atomic as atomic

    remove = atomic._remove
    monkeypatch.setattr(atomic, "_remove", lambda p: None if p.name.endswith(".old") else remove(p))
    with atomic_path(dest, force=True) as tmp:
        (tmp / "report.json").write_text("new")
    assert tree(dest) == {"report.json": b"new"}
    assert [p.name.endswith(".old") for p in tmp_path.iterdir() if p.name != "out"] == [True]


def test_multi_output_commit_is_all_or_nothing_and_leaves_no_empty_folder(tmp_path):
    a, b = tmp_path / "new" / "w0.5", tmp_path / "new" / "w1.0"
    with pytest.raises(RuntimeError), atomic_outputs([a, b]) as (ta, tb):
        (ta / "report.json").write_text("a")
        raise RuntimeError("the second width failed")
    assert not (tmp_path / "new").exists()
    with pytest.raises(EdgeCompileError, match="twice"), atomic_outputs([a, a]):
        pass


def test_duplicate_widths_are_refused_not_merged():
    """The README promises duplicates are refused: merging them silently hid a typo."""
    assert ModelConfig().parse_widths("0.5,1.0") == [0.5, 1.0]
    with pytest.raises(EdgeCompileError, match="names a width twice"):
        ModelConfig().parse_widths("0.5,0.5,1.0")


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    dest = tmp_path / "out"
    lock = OutputLock(dest)
    lock.acquire()
    try:
        with pytest.raises(EdgeCompileError, match=f"another edgecompile process \\(pid {os.getpid()}\\)"), atomic_path(dest):
            pass
    finally:
        lock.release()
    with atomic_path(dest) as tmp:
        (tmp / "report.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock file removed


def test_sigterm_cleans_like_ctrl_c_including_temporary_files(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), termination_as_interrupt(), atomic_path(dest) as tmp:
        (tmp / "report.json").write_text("{}")
        scratch = Path(tempfile.mkdtemp(suffix=".mlpackage"))  # what coremltools does during conversion
        assert tmp_path in scratch.parents
        os.kill(os.getpid(), signal.SIGTERM)
    assert not scratch.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_the_coremltools_import_is_not_swallowed(sig):
    """Deferred, then raised, also when the process has other threads (torch's workers) the kernel may pick."""
    import threading

    hit, stop = [], threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        with termination_as_interrupt(), pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), sig)
                time.sleep(0.05)  # the signal arrives while the block runs
                hit.append("the block ran to its end")  # e.g. `import coremltools`, whose bare except: would eat it
    finally:
        stop.set()
        worker.join()
    assert hit


def test_stale_staging_folders_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.abc123.partial"
    (stale / "out").mkdir(parents=True)
    with atomic_path(tmp_path / "out") as tmp:
        (tmp / "report.json").write_text("{}")
    assert not stale.exists()


# ---- 2. verification is a gate ---------------------------------------------------------------------------------
def _corrupt_one_weight(pkg: Path, value: np.float16) -> None:
    """Overwrite the first element of the largest fp16 weight in weight.bin (found by its bytes)."""
    from edgecompile.coreml.package import load_package

    view = load_package(pkg)
    consts = [o.outputs[0].val for o in view.main.operations if o.op_type == "const"]
    w = max((c for c in consts if isinstance(c, np.ndarray) and c.dtype == np.float16), key=lambda c: c.size)
    blob = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    at = bytes(data).index(w.tobytes()[:64])
    data[at:at + 2] = np.array([value], dtype=np.float16).tobytes()
    blob.write_bytes(bytes(data))


def test_verify_fails_a_package_with_one_flipped_exponent_and_a_nan(exported, tiny_checkpoint, tmp_path, capsys):
    src = Path(package_path(exported[0.5]))
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    from edgecompile.coreml.package import load_package

    w = max((o.outputs[0].val for o in load_package(bad).main.operations if o.op_type == "const"
             and isinstance(o.outputs[0].val, np.ndarray) and o.outputs[0].val.dtype == np.float16), key=lambda c: c.size)
    flipped = np.array([w.reshape(-1)[0]], np.float16).view(np.uint16) ^ np.uint16(0x4000)  # exponent MSB
    _corrupt_one_weight(bad, flipped.view(np.float16)[0])
    code, out, err = run_cli(["verify", str(bad), "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 1 and "verification failed" in err and len(err.strip().splitlines()) == 1
    _corrupt_one_weight(bad, np.float16(np.nan))
    code, out, err = run_cli(["verify", str(bad), "--checkpoint", str(tiny_checkpoint), "--json"], capsys)
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert code == 1 and data["passed"] is False and data["non_finite_outputs"] > 0 and data["psnr_db"] is None


def test_an_export_below_its_bar_ships_nothing_unless_kept(tiny_checkpoint, tmp_path, capsys):
    args = ["export", str(tiny_checkpoint), "--width", "0.5", "--min-psnr", "400"]
    code, _, err = run_cli([*args, "-o", str(tmp_path / "a")], capsys)
    assert code == 1 and "verification failed" in err and "nothing was written" in err
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli([*args, "-o", str(tmp_path / "b"), "--keep-failed"], capsys)
    report = json.loads((tmp_path / "b" / "w0.5" / "report.json").read_text())
    assert code == 1 and "kept for inspection" in err and report["verify"]["passed"] is False


# ---- 3. fp16 emulation follows the program; ops are strict ---------------------------------------------------------
def test_fp16_emulation_keeps_fp32_ops_fp32_and_honours_casts():
    from coremltools.converters.mil import Builder as mb

    from edgecompile.coreml.interpreter import MILInterpreter

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))])
    def prog(t):
        phase = mb.mul(x=t, y=np.float32(1000.0))  # fp32, as the package's timestep island
        s = mb.sin(x=phase)
        return mb.add(x=mb.cast(x=s, dtype="fp16"), y=np.float16(1.0))

    t = np.array([[0.8512, 0.5, 0.1234, 0.999]], np.float32)
    out = list(MILInterpreter(prog, precision="fp16").run({"t": t}).values())[0]
    island = np.sin(t * np.float32(1000)).astype(np.float16).astype(np.float32)
    want = (island + 1).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out, want)
    naive = np.sin(np.float16(t) * np.float16(1000))  # what rounding every op to fp16 would give
    assert np.abs(naive - island).max() > 0.05


def test_the_fp32_island_is_visible_to_the_emulation(exported, tiny_checkpoint, tmp_path):
    """Its reason to exist: a naive fp16 conversion verifies worse under the faithful emulation than ours."""
    from edgecompile.coreml.convert import convert_to_mlmodel
    from edgecompile.coreml.package import load_package
    from edgecompile.deploy.rewrite import deploy_model
    from edgecompile.export import verify_exported

    src = Path(package_path(exported[0.5]))
    ours = verify_exported(src, tiny_checkpoint, precision="fp16")
    ml = convert_to_mlmodel(deploy_model(load_checkpoint(tiny_checkpoint).model, 0.5), fp32_timestep_island=False)
    ml.user_defined_metadata.update(load_package(src).metadata)
    ml.save(str(tmp_path / src.name))
    naive = verify_exported(tmp_path / src.name, tiny_checkpoint, precision="fp16")
    assert ours.psnr_db >= 60 and ours.psnr_db > naive.psnr_db + 5, (ours.per_input_psnr_db, naive.per_input_psnr_db)


def test_interpreter_refuses_an_attribute_it_does_not_handle(monkeypatch):
    from coremltools.converters.mil import Builder as mb

    import edgecompile.coreml.interpreter as interp

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        return mb.rsqrt(x=x, epsilon=np.float32(0.5))

    x = np.full((2, 3), 1.5, np.float32)
    out = list(interp.MILInterpreter(prog).run({"x": x}).values())[0]
    np.testing.assert_allclose(out, 1 / np.sqrt(x + 0.5), rtol=1e-6)  # epsilon honoured, not dropped
    monkeypatch.setitem(interp.OPS, "rsqrt", lambda x: 1 / np.sqrt(x))  # an implementation that knows no epsilon
    with pytest.raises(EdgeCompileError, match="attribute\\(s\\) epsilon"):
        interp.MILInterpreter(prog)


# ---- 4. inputs checked before work ---------------------------------------------------------------------------------
def test_a_latent_that_cannot_fit_is_refused_with_the_figure(tiny_checkpoint, tmp_path, capsys):
    from edgecompile.model.budget import check_fits

    with pytest.raises(EdgeCompileError, match="needs at least .* GiB .*available"):
        check_fits(ModelConfig(), 0.5, (512, 512), "test", available=8 * 2**30)
    check_fits(ModelConfig.load("recipes/snapgenpp.yaml"), 1.0, (128, 128), "paper scale fits", available=24 * 2**30)
    for latent, needle in (("1024x1024", "needs at least"), ("4096x4096", "beyond 1024")):
        code, _, err = run_cli(["export", str(tiny_checkpoint), "--latent", latent, "-o", str(tmp_path / "o")], capsys)
        one_line_exit_2(code, err, needle)


@pytest.mark.parametrize("field,value,needle", [
    ("depth_middle", 10_000_000, "beyond"), ("hidden_dim", "1e9", "whole number"), ("head_dim", 6.5, "whole number"),
    ("hidden_dim", True, "whole number"), ("ffn_ratio", float("nan"), "finite"), ("widths", [0.5, float("inf")], "finite"),
])
def test_absurd_or_mistyped_config_fields_are_one_line_errors(field, value, needle, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**ModelConfig().to_dict(), field: value}).replace("NaN", "NaN"))
    code, _, err = run_cli(["info", str(cfg)], capsys)
    one_line_exit_2(code, err, needle)


def test_non_finite_weights_prompts_and_calibration_are_refused_by_name(tmp_path):
    from edgecompile.compress.calibration import CalibrationSet, load_calibration

    model = trained_like(TINY)
    name, param = list(model.named_parameters())[-1]
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    save_checkpoint(model, tmp_path / "nan")
    with pytest.raises(EdgeCompileError, match=name.replace(".", "\\.")):
        load_checkpoint(tmp_path / "nan")
    calib = CalibrationSet(torch.full((2, 1, 8, 8), float("nan")), torch.rand(2), torch.zeros(2, 3, 16), {"width": 0.5})
    calib.save(tmp_path / "c.safetensors")
    with pytest.raises(EdgeCompileError, match="'latent' holds 128 NaN"):
        load_calibration(tmp_path / "c.safetensors").check(TINY)
    CalibrationSet(torch.zeros(0, 1, 8, 8), torch.zeros(0), torch.zeros(0, 3, 16)).save(tmp_path / "empty.safetensors")
    with pytest.raises(EdgeCompileError, match="no inputs"):
        load_calibration(tmp_path / "empty.safetensors").check(TINY)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_checkpoint):
    """Files for the one-line-error table: a recipe with a NaN width, one with 4.7 bits, a calibration set of
    another width, a non-UTF-8 runs file, an empty calibration set."""
    from edgecompile.compress.calibration import CalibrationSet
    from edgecompile.compress.palettize_model import layer_shapes

    d = tmp_path_factory.mktemp("bad")
    layers = layer_shapes(TINY, 0.5, TINY.sample_size)
    recipe = {"format": "edgecompile-recipe", "format_version": 1, "width": 0.5, "layers": {n: {"bits": 4} for n in layers}}
    (d / "nan_width.json").write_text(json.dumps({**recipe, "width": float("nan")}))
    (d / "bits47.json").write_text(json.dumps({**recipe, "layers": {n: {"bits": 4.7} for n in layers}}))
    (d / "foreign.json").write_text(json.dumps({**recipe, "layers": {"no.such.layer": {"bits": 4}}}))
    CalibrationSet(torch.zeros(2, 1, 8, 8), torch.rand(2), torch.zeros(2, 3, 16), {"width": 1.0}).save(d / "w1.safetensors")
    CalibrationSet(torch.zeros(0, 1, 8, 8), torch.zeros(0), torch.zeros(0, 3, 16)).save(d / "empty.safetensors")
    (d / "runs.json").write_bytes(b"\xff\xfe\x00 not utf-8")
    return d


@pytest.mark.parametrize("args,needle", [
    (["export", "CKPT", "--query-chunk", "-1"], "--query-chunk"),
    (["export", "CKPT", "--target-bits", "nan", "--bits", "mixed"], "finite"),
    (["export", "CKPT", "--min-psnr", "inf"], "finite"),
    (["export", "CKPT", "--width", "nan"], "not a number"),
    (["export", "CKPT", "--latent", "0x8"], "positive"),
    (["export", "CKPT", "--group-size", "0", "--bits", "4", "--target", "iOS18"], "--group-size"),
    (["export", "CKPT", "--group-size", "5", "--bits", "4", "--target", "iOS18"], "does not divide"),
    (["export", "CKPT", "--bits", "mixed", "--recipe", "BAD/nan_width.json"], "width"),
    (["export", "CKPT", "--bits", "mixed", "--recipe", "BAD/bits47.json"], "whole number of bits"),
    (["export", "CKPT", "--bits", "mixed", "--recipe", "BAD/foreign.json"], "does not have"),
    (["export", "CKPT", "--bits", "mixed", "--calibration", "BAD/w1.safetensors"], "width 1"),
    (["export", "CKPT", "--bits", "mixed", "--calibration", "BAD/empty.safetensors"], "no inputs"),
    (["export", "CKPT", "--bogus-option"], "No such option"),
    (["calibrate", "CKPT", "--schedules", "0"], ">= 1"),
    (["calibrate", "CKPT", "--cfg", "nan"], "finite"),
    (["sweep", "CKPT", "--target-psnr", "nan"], "finite"),
    (["sweep", "CKPT", "--group-size", "5"], "does not divide"),
    (["bench", "--config", "recipes/toy.yaml", "--no-host", "--repeats", "0"], ">= 1"),
    (["bench", "--config", "recipes/toy.yaml", "--no-host", "--width", "abc"], "not a number"),
    (["bench", "--config", "recipes/toy.yaml", "--no-host", "--runs", "BAD/runs.json"], "cannot be read"),
    (["verify", "PKG", "--min-psnr", "nan"], "finite"),
])
def test_bad_options_are_one_line_errors_before_any_work(args, needle, tiny_checkpoint, bad_inputs, exported, tmp_path, capsys):
    out = tmp_path / "out"
    subs = {"CKPT": str(tiny_checkpoint), "PKG": package_path(exported[0.5])}
    args = [subs.get(a, a.replace("BAD", str(bad_inputs))) for a in args]
    if args[0] in ("export", "calibrate", "sweep"):
        args += ["-o", str(out)]
    code, _, err = run_cli(args, capsys)
    one_line_exit_2(code, err, needle)
    assert not out.exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    import edgecompile.model.checkpoint as checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    code, _, err = run_cli(["init", "recipes/toy.yaml", "-o", str(tmp_path / "new" / "ck")], capsys)
    one_line_exit_2(code, err, "no space left")
    assert list(tmp_path.iterdir()) == []


# ---- 6, 7. ONNX named for its weights and verified; package data -------------------------------------------------
def test_onnx_is_named_for_its_weights_verified_and_inspectable(tiny_checkpoint, tmp_path, capsys):
    code, out, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5", "--format", "onnx", "-o", str(tmp_path), "--json"], capsys)
    report = json.loads(out)["packages"][0]
    assert code == 0 and report["path"].endswith("_fp32.onnx") and report["verify"]["passed"]
    assert report["verify"]["runtime"].startswith("onnxruntime") and report["verify"]["psnr_db"] >= 100
    code, out, _ = run_cli(["inspect", report["path"], "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["weight_dtypes"] == ["float32"] and data["metadata"]["edgecompile.width"] == "0.5"
    code, _, err = run_cli(["verify", report["path"], "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 0, err


def test_device_profiles_and_ablation_configs_ship_as_package_data():
    import tomllib

    import edgecompile
    from edgecompile.model.config import RECIPES_DIR

    root = Path(edgecompile.__file__).parent
    assert RECIPES_DIR.is_relative_to(root) and (RECIPES_DIR / "devices").is_dir() and (RECIPES_DIR / "ablation").is_dir()
    globs = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edgecompile"]
    shipped = {p for g in globs for p in root.glob(g)}
    assert {p for p in RECIPES_DIR.rglob("*.yaml")} <= shipped


def test_an_interrupt_while_the_command_starts_is_one_line_and_130(tiny_checkpoint, tmp_path):
    """`python -m edgecompile` takes over signals before the CLI's two seconds of imports."""
    child = subprocess.Popen([sys.executable, "-m", "edgecompile", "export", str(tiny_checkpoint), "-o", str(tmp_path / "o")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip().splitlines() == ["edgecompile: interrupted; nothing was written"]
    assert not (tmp_path / "o").exists()


# ---- 8. package metadata: every field checked when read; tampering that PSNR does not see ---------------------------
def _edit_metadata(pkg: Path, **changes) -> None:
    """Rewrite keys of a package's edgecompile metadata in place (None deletes the key)."""
    from edgecompile.coremltools_loader import model_proto

    spec = pkg / "Data" / "com.apple.CoreML" / "model.mlmodel"
    model = model_proto().Model()
    model.ParseFromString(spec.read_bytes())
    meta = model.description.metadata.userDefined
    for key, value in changes.items():
        key = "edgecompile." + key
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    spec.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def palettized_package(tiny_checkpoint, tmp_path_factory):
    """One 4-bit export for the module; every test edits a copy (_copy)."""
    out = tmp_path_factory.mktemp("pal")
    from edgecompile.export import CompressionOptions, ExportOptions, VerificationOptions, run_export

    [report] = run_export(load_checkpoint(tiny_checkpoint), ExportOptions(
        output=out, widths=[0.5], compression=CompressionOptions(bits="4", distill=False), verification=VerificationOptions(verify=False)))
    return Path(report.path)


def _copy(pkg: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "w" / pkg.name
    shutil.copytree(pkg.parent, dest.parent)
    return dest


@pytest.mark.parametrize("changes,needle", [
    (dict(bits_per_layer="{not json"), "bits_per_layer is not JSON"),
    (dict(bits_per_layer='{"middle.0.attn.q": 3}'), "not one of"),
    (dict(bits_per_layer=None), "bits_per_layer is missing"),
    (dict(width="half"), "not a number"),
    (dict(width="0.7"), "not one of the config's widths"),
    (dict(latent="8x"), "not HxW"),
    (dict(latent="16x16"), "metadata was edited"),
    (dict(bits="3"), "is not one of"),
    (dict(group_size="-4"), "negative"),
    (dict(config='{"name": "other"}'), "does not match its recorded SHA-256"),
    (dict(checkpoint_sha256="abc"), "not a SHA-256"),
    (dict(chunk="3/2", chunk_packages='["a.mlpackage"]'), "not k/N"),
    (dict(weights_sha256='{"../x": "00"}'), "not an object of weight files"),
])
def test_package_metadata_is_checked_when_read(palettized_package, tiny_checkpoint, tmp_path, capsys, changes, needle):
    pkg = _copy(palettized_package, tmp_path)
    _edit_metadata(pkg, **changes)
    commands = [["verify", str(pkg), "--checkpoint", str(tiny_checkpoint)], ["inspect", str(pkg)]]
    if "bits_per_layer" in changes and changes["bits_per_layer"] == "{not json":  # every reader goes through from_strings: all four once
        commands += [["bench", str(pkg), "--no-host"], ["sample", str(pkg), "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "s.png")]]
    for args in commands:
        code, _, err = run_cli(args, capsys)
        one_line_exit_2(code, err, needle)
    assert not (tmp_path / "s.png").exists()


def test_a_replaced_config_with_a_matching_digest_is_refused(palettized_package, tiny_checkpoint, tmp_path, capsys):
    from edgecompile.digest import sha256_json

    pkg = _copy(palettized_package, tmp_path)
    config = {**load_checkpoint(tiny_checkpoint).config.to_dict(), "name": "renamed"}
    _edit_metadata(pkg, config=json.dumps(config, sort_keys=True), config_sha256=sha256_json(config))
    code, _, err = run_cli(["verify", str(pkg), "--checkpoint", str(tiny_checkpoint)], capsys)
    one_line_exit_2(code, err, "records another model config")


def test_one_flipped_sign_bit_fails_verification_naming_the_file(palettized_package, exported, tiny_checkpoint, tmp_path, capsys):
    """Far below what PSNR sees: the recorded SHA-256 of each weight file catches it, in fp16 and palettized packages."""
    for src in (Path(package_path(exported[0.5])), palettized_package):
        pkg = _copy(src, tmp_path / src.stem)
        blob = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0x80  # the sign bit of the last fp16 value (or of the last index byte)
        blob.write_bytes(bytes(data))
        code, out, err = run_cli(["verify", str(pkg), "--checkpoint", str(tiny_checkpoint), "--json"], capsys)
        data = json.loads(out)
        assert code == 1 and not data["passed"] and data["changed_weight_files"] == [f"{pkg.name}/Data/com.apple.CoreML/weights/weight.bin "
                                                                                     "differs from the exported one (SHA-256)"], err
        assert "weight.bin" in err and len(err.strip().splitlines()) == 1


def test_onnx_weights_are_digested_too(tiny_checkpoint, tmp_path, capsys):
    import onnx

    code, out, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5", "--format", "onnx", "--no-verify", "-o", str(tmp_path / "o"),
                              "--json"], capsys)
    assert code == 0, err
    path = Path(json.loads(out)["packages"][0]["path"])
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda i: len(i.raw_data))
    raw = bytearray(init.raw_data)
    raw[1] ^= 0x80
    init.raw_data = bytes(raw)
    onnx.save(model, str(path))
    code, _, err = run_cli(["verify", str(path), "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 1 and "initializers differs" in err, err


# ---- 9. full disks and other write errors of the libraries ----------------------------------------------------------
@pytest.mark.parametrize("message", ["[MIL FileWriter]: Unknown error occured while writing data to the file.",
                                     "filesystem error: cannot copy: Input/output error [/x/weights] [/y/weights]",
                                     "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left\" })"])
def test_a_library_write_error_is_the_os_error_it_stands_for(tmp_path, monkeypatch, message):
    import errno as errnos

    from edgecompile.atomic import as_os_error

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 0, 1 << 30))  # 1 GiB free
    mapped = as_os_error(RuntimeError(message), tmp_path)
    assert mapped is not None and mapped.errno == (errnos.ENOSPC if "28" in message else errnos.EIO)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 100))  # 100 bytes free
    assert as_os_error(RuntimeError(message), tmp_path).errno == errnos.ENOSPC
    assert as_os_error(RuntimeError("shapes do not match"), tmp_path) is None  # not a write error: left alone


def test_export_and_import_onto_a_full_disk_are_one_line_and_leave_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import safetensors

    import edgecompile.commands.write as write
    import edgecompile.model.checkpoint as checkpoint

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 100))

    def mil_writer(*a, **k):
        raise RuntimeError("[MIL FileWriter]: Unknown error occured while writing data to the file.")

    monkeypatch.setattr(write, "convert_to_mlmodel", mil_writer)
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5", "-o", str(tmp_path / "out")], capsys)
    one_line_exit_2(code, err, "no space left")
    assert not (tmp_path / "out").exists()

    def safetensors_full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint, "save_file", safetensors_full)
    code, _, err = run_cli(["init", "toy", "-o", str(tmp_path / "ck")], capsys)
    one_line_exit_2(code, err, "no space left")
    assert list(tmp_path.iterdir()) == []


# ---- 10. imported configs and weights: every field and dtype checked -----------------------------------------------
@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                               cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12)
    root = tmp_path_factory.mktemp("pixart") / "pipe"
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DPMSolverMultistepScheduler",
                                                                          "num_train_timesteps": 1000}))
    return root, model


def _bad_pixart(root: Path, tmp_path: Path, model, case: str) -> Path:
    bad = tmp_path / case
    shutil.copytree(root, bad)
    cfg_path, sched_path = bad / "transformer" / "config.json", bad / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    edits = {"patch0": {"patch_size": 0}, "heads_two": {"num_attention_heads": "two"}, "heads0": {"num_attention_heads": 0},
             "heads_half": {"num_attention_heads": 2.5}, "heads_str": {"num_attention_heads": "2"}, "interp": {"interpolation_scale": "big"},
             "caption_null": {"caption_channels": None}, "layers_bool": {"num_layers": True}}
    if case in edits:
        cfg_path.write_text(json.dumps({**cfg, **edits[case]}))
    elif case == "timesteps":
        sched_path.write_text(json.dumps({"num_train_timesteps": "many"}))
    elif case in ("map_ints", "map_outside"):
        (bad / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
        model.save_pretrained(bad / "transformer", max_shard_size="20KB")
        index = bad / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        data = json.loads(index.read_text())
        key = next(iter(data["weight_map"]))
        data["weight_map"][key] = 3 if case == "map_ints" else "../x.safetensors"
        index.write_text(json.dumps(data))
    elif case == "int8":
        from safetensors.torch import load_file, save_file

        path = bad / "transformer" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(str(path))
        key = next(k for k in tensors if k.endswith("to_q.weight"))
        tensors[key] = (tensors[key] * 100).to(torch.int8)
        save_file(tensors, str(path))
    return bad


@pytest.mark.parametrize("case,needle", [
    ("patch0", "patch_size = 0"), ("heads_two", "num_attention_heads = 'two' is not a whole number"), ("heads0", "in 1.."),
    ("heads_half", "2.5 is not a whole number"), ("heads_str", "'2' is not a whole number"), ("interp", "interpolation_scale = 'big'"),
    ("caption_null", "caption_channels is None but the weights hold caption_projection"), ("layers_bool", "num_layers = True"),
    ("timesteps", "num_train_timesteps = 'many'"), ("map_ints", "not a shard file name"), ("map_outside", "outside the model folder"),
    ("int8", "is int8"),
])
def test_imported_configs_and_weights_are_checked(pixart_folder, tmp_path, capsys, case, needle):
    root, model = pixart_folder
    bad = _bad_pixart(root, tmp_path, model, case)
    out = tmp_path / "ckpt"
    code, _, err = run_cli(["import", str(bad), "-o", str(out)], capsys)
    one_line_exit_2(code, err, needle)
    assert not out.exists()


# ---- 11. unbounded counts, stated up front -----------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--steps", "100000000"], "--steps"), (["--per-prompt", "100000000"], "--per-prompt"),
    (["--per-prompt", "200"], "more than the 1024"), (["--seed", "99999999999999999999999"], "--seed"),
])
def test_sample_counts_are_bounded_before_any_work(exported, tiny_checkpoint, tmp_path, capsys, args, needle):
    from safetensors.torch import save_file

    c = load_checkpoint(tiny_checkpoint).config
    save_file({"tokens": torch.zeros(10, c.text_len, c.text_dim), "null": torch.zeros(1, c.text_len, c.text_dim)}, str(tmp_path / "p.st"))
    code, _, err = run_cli(["sample", package_path(exported[0.5]), "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "g.png"),
                            "--prompts", str(tmp_path / "p.st"), *args], capsys)
    one_line_exit_2(code, err, needle)
    assert not (tmp_path / "g.png").exists()


def test_init_seed_and_prompt_counts_are_bounded(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    code, _, err = run_cli(["init", "toy", "-o", str(tmp_path / "c"), "--seed", "99999999999999999999999"], capsys)
    one_line_exit_2(code, err, "--seed")
    c = load_checkpoint(tiny_checkpoint).config
    save_file({"tokens": torch.zeros(2000, c.text_len, c.text_dim), "null": torch.zeros(1, c.text_len, c.text_dim)}, str(tmp_path / "p.st"))
    code, _, err = run_cli(["calibrate", str(tiny_checkpoint), "--prompts", str(tmp_path / "p.st"), "-o", str(tmp_path / "c.st")], capsys)
    one_line_exit_2(code, err, "at most 1024")


# ---- 12. the remaining tracebacks and silent acceptances -------------------------------------------------------------
@pytest.mark.parametrize("profile,needle", [("", "empty"), ("name: [unclosed", "cannot be read"), ("- 1\n- 2\n", "not a mapping"),
                                            ("name: x\nmemory_gbps: fast\n", "memory_gbps")])
def test_bad_device_profiles_are_one_line_errors(tmp_path, capsys, profile, needle):
    (tmp_path / "p.yaml").write_text(profile)
    code, _, err = run_cli(["bench", "--config", "toy", "--no-host", "--profile", str(tmp_path / "p.yaml")], capsys)
    one_line_exit_2(code, err, needle)


@pytest.mark.parametrize("median", ['"fast"', "NaN", "-1"])
def test_merged_runs_need_a_positive_median(exported, tmp_path, capsys, median):
    (tmp_path / "r.json").write_text('{"format": "edgecompile-run", "device": "iPhone", "package": "x", "median_ms": %s}' % median)
    code, _, err = run_cli(["bench", package_path(exported[0.5]), "--no-host", "--runs", str(tmp_path / "r.json")], capsys)
    one_line_exit_2(code, err, "median_ms")


def test_a_null_embedding_of_another_length_and_a_symlink_loop_are_refused(exported, tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    c = load_checkpoint(tiny_checkpoint).config
    save_file({"tokens": torch.zeros(2, c.text_len, c.text_dim), "null": torch.zeros(1, c.text_len + 1, c.text_dim)}, str(tmp_path / "p.st"))
    code, _, err = run_cli(["calibrate", str(tiny_checkpoint), "--prompts", str(tmp_path / "p.st"), "-o", str(tmp_path / "c.st")], capsys)
    one_line_exit_2(code, err, "'null' is")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for args in (["bench", str(tmp_path / "a"), "--no-host"], ["sample", str(tmp_path / "a"), "-o", str(tmp_path / "g.png")]):
        code, _, err = run_cli(args, capsys)
        one_line_exit_2(code, err, "symbolic link")


def test_calibrate_records_the_guidance_it_was_given_and_widths_are_named_once(tiny_checkpoint, tmp_path, capsys):
    from edgecompile.compress.calibration import load_calibration

    code, _, err = run_cli(["calibrate", str(tiny_checkpoint), "--width", "0.5", "--schedules", "2", "--cfg", "5", "-o", str(tmp_path / "c.st")],
                           capsys)
    assert code == 0, err
    assert load_calibration(tmp_path / "c.st").meta["cfg_scale"] == 5.0
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--width", "0.5,0.5", "-o", str(tmp_path / "o")], capsys)
    one_line_exit_2(code, err, "names a width twice")
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--bits", "mixed", "--candidates", "4,4,8", "-o", str(tmp_path / "o")], capsys)
    one_line_exit_2(code, err, "names a value twice")


def test_a_quoted_format_version_says_what_is_wrong(tiny_checkpoint, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    meta = json.loads((ck / "checkpoint.json").read_text())
    (ck / "checkpoint.json").write_text(json.dumps({**meta, "format_version": "1"}))
    code, _, err = run_cli(["info", str(ck)], capsys)
    one_line_exit_2(code, err, "not a whole number", "without quotes")


# ---- 13. progress where stderr is not a terminal ----------------------------------------------------------------------
def test_progress_is_plain_lines_with_stage_ends_and_an_eta_off_a_terminal():
    import io

    from edgecompile.commands.progress import LogProgress, stage_display

    now = [0.0]
    stream = io.StringIO()
    with LogProgress(stream, every=10, clock=lambda: now[0]) as p:
        p.on_stage("calibrate")
        for done in range(1, 11):
            now[0] += 3
            p.update("trajectories", done, 10)
        p.on_stage("convert")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "edgecompile: [0:00] calibrate: started"
    assert "calibrate: trajectories 4/10, eta 0:18" in lines[1]  # 12 s for 4 of 10: 18 s to go
    assert lines[-3].endswith("calibrate: done in 0:30") and lines[-2].endswith("convert: started") and lines[-1].endswith("convert: done in 0:00")
    assert len(lines) == 7  # at most one line per 10 s within a stage, and the stage's last step
    assert isinstance(stage_display(None, io.StringIO()), LogProgress)  # not a terminal: plain lines


def test_core_ai_formats_without_coreai_installed_are_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--format aimodel where coreai-torch / coreai-core are not installed: how to install them, before any work."""
    from tests.test_coreml import run_cli

    monkeypatch.setitem(sys.modules, "coreai_torch", None)  # what an import finds when the package is absent
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--format", "aimodel", "-o", str(tmp_path / "o")], capsys)
    one_line_exit_2(code, err, "coreai_torch is not installed", "pip install 'edgecompile[coreai]'")
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(["export", str(tiny_checkpoint), "--pipeline", "--format", "onnx", "-o", str(tmp_path / "o")], capsys)
    one_line_exit_2(code, err, "drop --format onnx")

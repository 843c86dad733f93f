"""The slow half of the robustness suite (the fast half is tests/test_robustness.py): real processes, real signals.

Cases, each run through the `edgecompile` CLI in a child process on a tiny random checkpoint:
- concurrent: two exports to the same -o started together;
- signals: SIGTERM / SIGINT at several moments of a mixed-bit export (the coremltools import included), with the
  child's TMPDIR pointed at an empty folder: exit code, leftovers in the output's parent and in TMPDIR;
- full disk: an export into a 256 KiB tmpfs, smaller than the package (skipped where mounting is not allowed);
- absurd sizes: each under an RSS watchdog (killed above 4 GiB or 120 s): peak RSS, wall time, exit, message;
- determinism: the same mixed-bit export twice with 2 torch threads and once with 1: which files differ in content
  (the package's protobuf compared as a message, the Manifest's random item UUIDs and the recipe's timings set
  aside, since coremltools and the clock make those differ on every run), and how far the 1-thread package's
  outputs are from the 2-thread one's;
- packaging: a wheel installed with --target (not editable) runs `bench --config` from another folder.

    python benchmarks/robustness.py [--output benchmarks/results]

Writes robustness.json and robustness.md (the table) to the output folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, write_result

from edgecompile.export_report import without_timings

TINY = {"name": "tiny", "hidden_dim": 32, "head_dim": 8, "num_heads": 8, "num_kv_heads": 4, "text_dim": 16, "text_len": 3,
        "depth_down": 1, "depth_middle": 2, "depth_up": 1, "ffn_ratio": 2, "ffn_ratio_middle": 2, "widths": [0.5, 1.0],
        "bna_blocks": 4}
WATCH_RSS = 4 * 2**30
WATCH_SECONDS = 120


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "edgecompile", *map(str, args)]


def run(args, env=None, cwd=None, kill_after=None, sig=signal.SIGTERM, timeout=WATCH_SECONDS) -> dict:
    """Run a child; poll its RSS (VmHWM); kill it past the watchdog limits or send `sig` after `kill_after` s."""
    start = time.perf_counter()
    child = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    peak, signalled, watchdog = 0, False, None
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            peak = max(peak, int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024)
        except (OSError, StopIteration):
            pass
        elapsed = time.perf_counter() - start
        if kill_after is not None and not signalled and elapsed >= kill_after:
            child.send_signal(sig)
            signalled = True
        if peak > WATCH_RSS or elapsed > timeout:
            watchdog = f"killed by the watchdog at {peak / 2**30:.2f} GiB, {elapsed:.0f} s"
            child.kill()
        time.sleep(0.02)
    out, err = child.communicate()
    return {"exit": child.returncode, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak / 2**20, 1),
            "stderr_last_line": (err.strip().splitlines() or [""])[-1][:300], "stderr_lines": len(err.strip().splitlines()),
            "watchdog": watchdog, "stdout": out}


TORCH_CACHE = "torchinductor_"  # torch's persistent cache folder: `import torch._dynamo` creates it in every torch program


def leftovers(folder: Path, keep: set[str] = frozenset()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep and not p.name.startswith(TORCH_CACHE)) if folder.exists() else []


def digest_tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def concurrent(ckpt: Path, work: Path) -> dict:
    out = work / "concurrent"
    children = [subprocess.Popen(cli("export", ckpt, "--width", "0.5", "-o", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    results = [(c.wait(), c.stderr.read().strip().splitlines()[-1:] or [""]) for c in children]
    report = out / "w0.5" / "report.json"
    return {"exits": sorted(r[0] for r in results), "refused_message": next((r[1][0] for r in results if r[0] != 0), ""),
            "one_verified_package": report.is_file() and json.loads(report.read_text())["verify"]["passed"],
            "leftovers": leftovers(out, {"w0.5"})}


def signals(ckpt: Path, work: Path) -> list[dict]:
    rows = []
    for sig, after in [(signal.SIGTERM, 0.3), (signal.SIGINT, 1.0), (signal.SIGTERM, 2.0), (signal.SIGTERM, 4), (signal.SIGTERM, 8),
                       (signal.SIGTERM, 14), (signal.SIGINT, 20), (signal.SIGTERM, 28)]:
        parent = work / f"sig_{sig.name}_{after}"
        tmpdir = work / f"tmp_{sig.name}_{after}"
        parent.mkdir()
        tmpdir.mkdir()
        r = run(cli("export", ckpt, "--width", "0.5,1.0", "--bits", "mixed", "-o", parent / "out"), env={"TMPDIR": str(tmpdir)},
                kill_after=after, sig=sig)
        rows.append({"signal": sig.name, "after_s": after, "exit": r["exit"], "seconds": r["seconds"],
                     "output_parent_leftovers": leftovers(parent), "tmpdir_leftovers": leftovers(tmpdir),
                     "message": r["stderr_last_line"]})
    return rows


def full_disk(ckpt: Path, work: Path) -> list[dict]:
    """Each writer onto a small tmpfs: coremltools' (export), safetensors' (import, init, calibrate)."""
    pixart = pixart_folder(work)
    cases = [("export to a 256 KiB tmpfs", "256k", lambda mnt: cli("export", ckpt, "--width", "1.0", "-o", mnt / "out")),
             ("export to a 600 KiB tmpfs", "600k", lambda mnt: cli("export", ckpt, "--width", "1.0", "-o", mnt / "out")),
             ("init onto a 64 KiB tmpfs", "64k", lambda mnt: cli("init", work / "tiny.json", "-o", mnt / "ck")),
             ("calibrate onto a 16 KiB tmpfs", "16k", lambda mnt: cli("calibrate", ckpt, "--width", "1.0", "-o", mnt / "c.safetensors"))]
    if pixart is not None:
        cases.append(("import onto an 8 KiB tmpfs", "8k", lambda mnt: cli("import", pixart, "-o", mnt / "ck")))
    rows = []
    for label, size, args in cases:
        mnt = work / f"small_disk_{len(rows)}"
        mnt.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
        if mounted.returncode != 0:
            rows.append({"case": label, "skipped": f"no tmpfs here ({mounted.stderr.strip()[:120]})"})
            continue
        try:
            r = run(args(mnt))
            rows.append({"case": label, "exit": r["exit"], "stderr_lines": r["stderr_lines"], "message": r["stderr_last_line"],
                         "leftovers": leftovers(mnt)})
        finally:
            subprocess.run(["umount", str(mnt)])
    return rows


def pixart_folder(work: Path) -> Path | None:
    """A tiny PixArt transformer saved by diffusers (None without diffusers)."""
    try:
        import diffusers
    except ImportError:
        return None
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                               cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12)
    model.save_pretrained(work / "pixart")
    return work / "pixart"


def tampering(ckpt: Path, work: Path) -> list[dict]:
    """A package changed after export: one sign bit of weight.bin, a metadata field that is not JSON."""
    out = work / "tamper"
    r = run(cli("export", ckpt, "--width", "1.0", "--no-verify", "-o", out, "--json"))
    assert r["exit"] == 0, r
    pkg = next((out / "w1.0").glob("*.mlpackage"))
    rows = []
    flipped = work / "flipped" / pkg.name
    shutil.copytree(pkg, flipped)
    blob = flipped / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x80
    blob.write_bytes(bytes(data))
    r = run(cli("verify", flipped, "--checkpoint", ckpt))
    rows.append({"case": "one sign bit of weight.bin flipped", "exit": r["exit"], "stderr_lines": r["stderr_lines"], "message": r["stderr_last_line"]})
    edited = work / "edited" / pkg.name
    shutil.copytree(pkg, edited)
    from edgecompile.coremltools_loader import model_proto
    from edgecompile.deploy.metadata import BITS_PER_LAYER

    spec = edited / "Data" / "com.apple.CoreML" / "model.mlmodel"
    model = model_proto().Model()
    model.ParseFromString(spec.read_bytes())
    model.description.metadata.userDefined[BITS_PER_LAYER] = "{not json"
    spec.write_bytes(model.SerializeToString())
    for command in ("verify", "inspect", "bench"):
        args = [command, edited] + (["--checkpoint", ckpt] if command == "verify" else ["--no-host"] if command == "bench" else [])
        r = run(cli(*args))
        rows.append({"case": f"{command}: bits_per_layer not JSON", "exit": r["exit"], "stderr_lines": r["stderr_lines"],
                     "message": r["stderr_last_line"]})
    return rows


def absurd_sizes(ckpt: Path, work: Path) -> list[dict]:
    configs = {
        "depth_middle: 10000000": {**TINY, "depth_middle": 10_000_000},
        "hidden_dim: '1e9'": {**TINY, "hidden_dim": "1e9"},
        "hidden_dim: 65536, 512 blocks": {**TINY, "hidden_dim": 65536, "num_heads": 8, "head_dim": 8192 // 8,
                                          "depth_down": 0, "depth_up": 0, "depth_middle": 512},
    }
    cases = []
    for label, cfg in configs.items():
        path = work / f"cfg_{len(cases)}.json"
        path.write_text(json.dumps(cfg))
        cases.append((f"info ({label})", cli("info", path)))
        cases.append((f"init ({label})", cli("init", path, "-o", work / f"init_{len(cases)}")))
    cases += [(f"export --latent {s}", cli("export", ckpt, "--latent", s, "-o", work / f"big_{s}")) for s in ("4096x4096", "1024x1024", "512x512")]
    cases.append(("calibrate --latent 512x512", cli("calibrate", ckpt, "--latent", "512x512", "-o", work / "big.safetensors")))
    # sampling counts: bounded up front, not found by running out of time
    cases.append(("init --seed 99999999999999999999999", cli("init", work / "tiny.json", "-o", work / "seed", "--seed", "99999999999999999999999")))
    out = work / "for_sample"
    subprocess.run(cli("export", ckpt, "--width", "1.0", "--no-verify", "-o", out), check=True, capture_output=True)
    pkg = next((out / "w1.0").glob("*.mlpackage"))
    prompts = work / "prompts.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"tokens": torch.zeros(20_000, TINY["text_len"], TINY["text_dim"]), "null": torch.zeros(1, TINY["text_len"], TINY["text_dim"])},
              str(prompts))
    for label, extra in (("sample --steps 100000000", ["--steps", "100000000"]),
                         ("sample --per-prompt 100000000", ["--per-prompt", "100000000"]),
                         ("sample with 20,000 prompts", ["--prompts", prompts]),
                         ("sample --seed 99999999999999999999999", ["--seed", "99999999999999999999999"])):
        cases.append((label, cli("sample", pkg, "--checkpoint", ckpt, "-o", work / "grid.png", *extra)))
    rows = []
    for label, args in cases:
        r = run(args)
        rows.append({"case": label, "exit": r["exit"], "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                     "watchdog": r["watchdog"], "stderr_lines": r["stderr_lines"], "message": r["stderr_last_line"]})
    return rows


def content_digest(path: Path) -> str:
    """A digest of what a file means: protobuf as a message, Manifest without its random UUIDs, recipe without timings."""
    data = path.read_bytes()
    if path.name == "model.mlmodel":
        from coremltools.proto import Model_pb2

        message = Model_pb2.Model()
        message.ParseFromString(data)
        data = message.SerializeToString(deterministic=True)
    elif path.name == "Manifest.json":
        manifest = json.loads(data)
        data = json.dumps(sorted(json.dumps(v, sort_keys=True) for v in manifest["itemInfoEntries"].values())).encode()
    elif path.name == "recipe.json":
        data = json.dumps(without_timings(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def determinism(ckpt: Path, work: Path) -> dict:
    import numpy as np

    from edgecompile.coreml.interpreter import MILInterpreter
    from edgecompile.coreml.package import load_package
    from edgecompile.coreml.verify import verification_inputs
    from edgecompile.metrics import psnr_db
    from edgecompile.model.config import ModelConfig

    bytes_, meaning, packages = {}, {}, {}
    for label, threads in (("2 threads", "2"), ("2 threads again", "2"), ("1 thread", "1")):
        out = work / f"det_{label.replace(' ', '_')}" / "w0.5"
        # a fixed step count: the default time budget sizes distillation by the machine's speed
        r = run(cli("export", ckpt, "--width", "0.5", "--bits", "mixed", "--distill-steps", "200", "-o", out.parent),
                env={"OMP_NUM_THREADS": threads}, timeout=600)
        assert r["exit"] == 0, r
        files = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != "report.json"]
        bytes_[label] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        meaning[label] = {str(p.relative_to(out)): content_digest(p) for p in files}
        packages[label] = next(out.glob("*.mlpackage"))

    def differing(table, a, b):
        return sorted(k for k in table[a] if table[a][k] != table[b].get(k))

    config = ModelConfig.from_dict(json.loads((ckpt / "checkpoint.json").read_text())["model"])
    outputs = {}
    for label in ("2 threads", "1 thread"):
        interp = MILInterpreter(load_package(packages[label]).program)
        outputs[label] = [interp.run({"latent_image_embeddings": x.numpy(), "timestep": t.numpy(), "token_level_text_embeddings": c.numpy()})
                          ["denoiser_output"] for x, t, c in verification_inputs(config, tuple(config.sample_size))]
    psnrs = [psnr_db(np.asarray(a), np.asarray(b)) for a, b in zip(outputs["2 threads"], outputs["1 thread"])]
    return {"same threads, two runs: files differing in bytes": differing(bytes_, "2 threads", "2 threads again"),
            "same threads, two runs: files differing in content": differing(meaning, "2 threads", "2 threads again"),
            "1 vs 2 threads: files differing in content": differing(meaning, "2 threads", "1 thread"),
            "1 vs 2 threads: package outputs, worst PSNR of one against the other (dB)": round(min(psnrs), 1)}


def packaging(work: Path) -> dict:
    wheels, target = work / "wheels", work / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        return {"skipped": built.stderr.strip()[-200:]}
    wheel = next(wheels.glob("edgecompile-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target)}
    r = run(cli("bench", "--config", target / "edgecompile" / "recipes" / "toy.yaml", "--no-host", "--json"), env=env, cwd=elsewhere)
    return {"exit": r["exit"], "from": "wheel installed with pip --target, run from an unrelated folder",
            "devices_loaded": list(json.loads(r["stdout"])["cost_model"]["devices"]) if r["exit"] == 0 else r["stderr_last_line"]}


def markdown(data: dict) -> str:
    lines = ["| case | outcome |", "|---|---|"]
    c = data["concurrent"]
    lines.append(f"| two exports to one -o | exits {c['exits']}; refused: `{c['refused_message'][:90]}`; one verified package: "
                 f"{c['one_verified_package']}; leftovers {c['leftovers']} |")
    for r in data["signals"]:
        lines.append(f"| {r['signal']} after {r['after_s']} s | exit {r['exit']} at {r['seconds']} s; leftovers beside the output "
                     f"{r['output_parent_leftovers']}, in TMPDIR {r['tmpdir_leftovers']} |")
    for fd in data["full_disk"]:
        disk = fd.get("skipped") or f"exit {fd['exit']}, {fd['stderr_lines']} line: `{fd['message'][:110]}`; leftovers {fd['leftovers']}"
        lines.append(f"| {fd['case']} | {disk} |")
    for r in data.get("tampering", []):
        lines.append(f"| {r['case']} | exit {r['exit']}, {r['stderr_lines']} line: `{r['message'][:130]}` |")
    for r in data["absurd_sizes"]:
        lines.append(f"| {r['case']} | exit {r['exit']} in {r['seconds']} s at {r['peak_rss_mib']:.0f} MiB peak RSS"
                     f"{'; ' + r['watchdog'] if r['watchdog'] else ''}; `{r['message'][:110]}` |")
    for k, v in data["determinism"].items():
        lines.append(f"| determinism: {k} | {v or 'none'} |")
    p = data["packaging"]
    package = p.get("skipped") or f"exit {p['exit']}, device profiles {p['devices_loaded']}"
    lines.append(f"| non-editable install | {package} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--only", default="concurrent,signals,full_disk,tampering,absurd_sizes,determinism,packaging")
    args = parser.parse_args()
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="edgecompile-robustness-"))
    try:
        (work / "tiny.json").write_text(json.dumps(TINY))
        ckpt = work / "ckpt"
        subprocess.run(cli("init", work / "tiny.json", "-o", ckpt), check=True, capture_output=True)
        data = {}
        for name in args.only.split(","):
            t = time.perf_counter()
            data[name] = globals()[name](*((ckpt, work) if name != "packaging" else (work,)))
            print(f"{name}: {time.perf_counter() - t:.0f} s\n{json.dumps(data[name], indent=1)[:3000]}", flush=True)
        path = write_result("robustness", data, args.output)
        path.with_suffix(".md").write_text(markdown(data))
        print(markdown(data))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

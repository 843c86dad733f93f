import pytest
import json

from edgecompile.model.checkpoint import load_checkpoint
from tests.test_coreml import run_cli


def test_info_json_on_a_config(capsys):
    code, out, _ = run_cli(["info", "recipes/snapgenpp.yaml", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and set(data["widths"]) == {"0.375", "0.5", "1.0"}
    full = data["widths"]["1.0"]
    assert full["weight_bytes_fp16"] == 2 * full["params"]
    assert full["tokens"] == {"down": 4096, "middle": 1024, "up": 4096}


def test_info_token_counts_follow_the_latent(capsys):
    code, out, _ = run_cli(["info", "recipes/toy.yaml", "--latent", "8x16", "--json"], capsys)
    assert json.loads(out)["widths"]["0.5"]["tokens"] == {"down": 128, "middle": 32, "up": 128}


def test_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["init", "recipes/toy.yaml", "-o", str(tmp_path / "ck"), "--seed", "3"], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.config.name == "toy" and ckpt.provenance["seed"] == 3
    code, _, err = run_cli(["init", "recipes/toy.yaml", "-o", str(tmp_path / "ck")], capsys)
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("latent_hw", [(8, 8), (16, 16)])
def test_bundled_checkpoint_generates_recognisable_digits(latent_hw):
    """The bundled model was trained at 8x8 and at 16x16 (the digits upsampled): it draws digits at both sizes."""
    from edgecompile.model.digits import sample_accuracy, train_classifier

    ckpt = load_checkpoint()
    assert ckpt.prompts is not None and ckpt.prompts.tokens.shape[0] == 10
    assert [tuple(s) for s in ckpt.provenance["latent_sizes"]] == [(8, 8), (16, 16)]
    clf = train_classifier()
    acc, samples = sample_accuracy(lambda x, t, c: ckpt.model(x, t, c, width=1.0), ckpt.prompts, clf, per_class=5, steps=4,
                                   latent_hw=latent_hw)
    assert samples.shape == (50, 1, *latent_hw)
    # 4 steps, as the app samples (the README's figures use 20 per class at 4 and 20 steps); 5 per class keeps it fast
    assert acc >= 0.7


def test_export_summary_reads_at_80_columns(exported, monkeypatch):
    """The closing summary: a per-width table and one line of stage times per width, none wider than 80 columns."""
    from rich.console import Console

    import edgecompile.cli as cli

    console = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(cli, "out", console)
    reports = [exported[0.5], exported[1.0]]
    console.print(cli.render.export_table("tiny", reports))
    for line in cli.render.export_lines(reports):
        console.print(line, overflow="fold")
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    for r in reports:
        assert f"{r.size_bytes / 2**20:.2f} MiB" in text and f"{r.verify.psnr_vs_checkpoint_db:.1f} dB" in text
        assert ", ".join(f"{k} {s:.1f}s" for k, s in list(r.stage_seconds.items())[:2]) in text


def test_every_option_of_every_command_has_help_and_one_name_per_concept():
    """Each option says what it does (click shows its default); the sweep and bench spell concepts as export does."""
    import click

    from edgecompile.cli import cli

    missing = [f"{name} {p.opts[0]}" for name, cmd in cli.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not missing, missing
    sweep_opts = {o for p in cli.commands["sweep"].params for o in p.opts}
    export_opts = {o for p in cli.commands["export"].params for o in p.opts}
    assert {"--candidates", "--sweep-mode", "--calibration-latent"} <= sweep_opts & export_opts
    assert "--profile" in {o for p in cli.commands["bench"].params for o in p.opts}


def test_old_option_spellings_still_work_but_are_not_shown(tiny_checkpoint, tmp_path, capsys):
    from tests.test_coreml import run_cli

    code, out, _ = run_cli(["sweep", "--help"], capsys)
    assert "--candidates" in out and "--mode " not in out and "--bits" not in out
    code, out, err = run_cli(["sweep", str(tiny_checkpoint), "--width", "1.0", "--bits", "4,8", "--mode", "local", "--latent", "8x8",
                              "-o", str(tmp_path / "r.json"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["mode"] == "local"


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from tests.test_coreml import run_cli

    monkeypatch.chdir(tmp_path)  # not the source tree
    for source in ("snapgenpp", "snapgenpp.yaml", "recipes/snapgenpp.yaml"):
        code, out, err = run_cli(["info", source, "--json"], capsys)
        assert code == 0 and json.loads(out)["config"] == "snapgenpp", (source, err)
    code, _, err = run_cli(["init", "toy", "-o", str(tmp_path / "ck")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["bench", "--config", "toy", "--width", "0.5", "--no-host", "--profile", "iphone12"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["info", "nosuchmodel"], capsys)
    assert code == 2 and "looked for a checkpoint folder, a YAML/JSON config file and a config shipped" in err and "snapgenpp" in err


def test_inspect_prints_io_names_whole_at_80_columns(exported, monkeypatch, capsys):
    from rich.console import Console

    import edgecompile.cli as cli
    from edgecompile.coreml.package import load_package

    console = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(cli, "out", console)
    path = exported[0.5].path
    cli.cli.main(args=["inspect", path], standalone_mode=False)
    text = console.export_text()
    view = load_package(path)
    for f in (*view.inputs, *view.outputs):
        assert f"{f['name']}  {'x'.join(map(str, f['shape']))}" in text, f["name"]

"""PixArt-alpha / PixArt-Sigma from diffusers: imported, rewritten and exported, each proven equal to diffusers'
own forward on tiny random models built and saved here (no downloads)."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from edgecompile.coreml.interpreter import MILInterpreter  # noqa: E402
from edgecompile.coreml.package import load_package  # noqa: E402
from edgecompile.deploy.contract import TEXT_MASK, LATENT, OUTPUT, TEXT, TIMESTEP, text_to_package  # noqa: E402
from edgecompile.deploy.rewrite import deploy_model  # noqa: E402
from edgecompile.export import CompressionOptions, ExportOptions, LatentPlan, PackageOptions, run_export  # noqa: E402
from edgecompile.metrics import psnr_db  # noqa: E402
from edgecompile.model.checkpoint import load_checkpoint  # noqa: E402
from edgecompile.model.importers import import_checkpoint  # noqa: E402
from edgecompile.model.sampling import ddim_sample  # noqa: E402
from tests.test_coreml import run_cli  # noqa: E402

TEXT_LEN = 7
# tiny versions of the two published families: alpha with micro-conditions (sample_size 128 turns them on in
# diffusers; here explicitly), Sigma without, with another interpolation scale; both learned-sigma
FAMILIES = {
    "alpha": dict(use_additional_conditions=True, interpolation_scale=None),
    "sigma": dict(use_additional_conditions=False, interpolation_scale=2),
}


def tiny_pixart(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=48,
        sample_size=16, patch_size=2, caption_channels=40, **FAMILIES[family]).eval()
    with torch.no_grad():  # zero-initialised parts (adaLN-zero style) get values, so every tensor is exercised
        for p in model.parameters():
            if not p.abs().any():
                p.normal_(0, 0.05)
    return model


def diffusers_forward(model, latent, t, text_btd, mask=None):
    h, w = latent.shape[2:]
    cond = None
    if model.config.use_additional_conditions:
        b = latent.shape[0]
        cond = {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).repeat(b, 1), "aspect_ratio": torch.tensor([[h / w]]).repeat(b, 1)}
    with torch.no_grad():
        out = model(latent, encoder_hidden_states=text_btd, timestep=t, added_cond_kwargs=cond or {"resolution": None, "aspect_ratio": None},
                    encoder_attention_mask=mask)
    return out.sample[:, : model.config.in_channels]  # the noise prediction; the variance channels are dropped


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = tiny_pixart(family)
    model.save_pretrained(root / "diffusers")
    import_checkpoint(root / "diffusers", root / "ckpt", text_len=TEXT_LEN)
    return family, model, load_checkpoint(root / "ckpt"), root


def inputs(hw, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, 4, *hw), generator=g), torch.tensor([999.0, 421.0][:batch]),
            torch.randn((batch, TEXT_LEN, 40), generator=g))


def short_prompts(batch=2):
    """Text masks of prompts shorter than the text length: 3 and 5 tokens of TEXT_LEN, the rest padding."""
    mask = torch.zeros(batch, TEXT_LEN)
    for i in range(batch):
        mask[i, : 3 + 2 * i] = 1
    return mask


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_and_deploy_graph_equal_diffusers(imported, hw, masked):
    """With the text attention mask, padding tokens are masked as diffusers masks them (encoder_attention_mask)."""
    family, model, ckpt, _ = imported
    latent, t, text = inputs(hw)
    mask = short_prompts() if masked else None
    want = diffusers_forward(model, latent, t, text, mask).numpy()
    with torch.no_grad():
        ours = ckpt.model(latent, t, text, text_mask=mask).numpy()
        deployed = deploy_model(ckpt.model, 1.0, latent_hw=hw)(latent, t, text_to_package(text), mask).numpy()
    assert psnr_db(want, ours) >= 100, family
    assert psnr_db(want, deployed) >= 100, family
    if masked:  # the mask changes the output: without it the package would not compute what diffusers computes
        assert psnr_db(want, diffusers_forward(model, latent, t, text).numpy()) < 60


def test_import_records_the_family_options(imported):
    family, _, ckpt, _ = imported
    c = ckpt.config
    assert (c.prediction, c.position_table, c.cross_attention_norm, c.caption_projection) == ("epsilon", "pixart", False, True)
    assert c.micro_conditions == (family == "alpha")
    assert c.depth_middle == 2 and c.depth_down == c.depth_up == 0 and not c.stage_downsample
    assert ckpt.provenance["import"]["learned_sigma_dropped"] is True


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_exported_fp16_package_equals_diffusers(imported, hw, tmp_path):
    family, model, ckpt, _ = imported
    [report] = run_export(ckpt, ExportOptions(output=tmp_path, widths=[1.0], latents=LatentPlan(package=hw)))
    assert report.verify.passed
    view = load_package(report.path)
    assert "DDPM" in view.metadata["edgecompile.io"]
    latent, t, text = inputs(hw, batch=1, seed=3)
    mask = short_prompts(1)
    out = MILInterpreter(view.program, precision="fp16").run(
        {LATENT: latent.numpy(), TIMESTEP: t.numpy(), TEXT: text_to_package(text).numpy(), TEXT_MASK: mask.numpy()})[OUTPUT]
    assert psnr_db(diffusers_forward(model, latent, t, text, mask).numpy(), out) >= 60, family


def test_palettized_export_with_swift_resources_onnx_verify_and_inspect(imported, tmp_path, capsys):
    family, _, ckpt, _ = imported
    [mixed] = run_export(ckpt, ExportOptions(output=tmp_path / "mixed", widths=[1.0], compression=CompressionOptions(bits="mixed", distill_steps=5),
        package=PackageOptions(swift_resources=True)))
    assert mixed.verify.passed and 4 < mixed.average_bits < 8
    contract = json.loads((tmp_path / "mixed" / "w1.0" / "Resources" / "denoiser_contract.json").read_text())
    assert "epsilon" in contract["outputs"][OUTPUT]["meaning"] and "DDPM" in contract["scheduler"]
    [onnx] = run_export(ckpt, ExportOptions(output=tmp_path / "onnx", widths=[1.0], package=PackageOptions(fmt="onnx")))
    assert onnx.verify.passed
    code, out, _ = run_cli(["verify", mixed.path, "--checkpoint", str(ckpt.path), "--json"], capsys)
    assert code == 0 and json.loads(out)["passed"]
    code, out, _ = run_cli(["inspect", mixed.path, "--json"], capsys)
    assert code == 0 and 4 < json.loads(out)["average_bits"] < 8


def test_sharded_and_half_precision_sources_import_to_the_same_model(imported, tmp_path):
    family, model, ckpt, _ = imported
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    import_checkpoint(tmp_path / "sharded", tmp_path / "a")
    a = load_checkpoint(tmp_path / "a").model.state_dict()
    assert all(torch.equal(a[k], v) for k, v in ckpt.model.state_dict().items())
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.float()
    import_checkpoint(tmp_path / "bf16", tmp_path / "b", dtype="bfloat16")
    assert load_checkpoint(tmp_path / "b").dtype == "bfloat16"


def test_pipeline_folder_takes_its_scheduler(imported, tmp_path):
    _, model, _, _ = imported
    pipe = tmp_path / "pipe"
    model.save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    diffusers.DPMSolverMultistepScheduler(beta_start=0.0002, beta_end=0.03).save_pretrained(pipe / "scheduler")
    import_checkpoint(pipe, tmp_path / "ckpt", text_len=5)
    c = load_checkpoint(tmp_path / "ckpt").config
    assert (c.beta_start, c.beta_end, c.text_len) == (0.0002, 0.03, 5)


def test_ddim_sampler_equals_diffusers_ddim():
    torch.manual_seed(0)
    eps_model = lambda x, t, c: torch.tanh(x * 0.3 + t[:, None, None, None] / 1000 + c.mean())  # noqa: E731
    noise, text = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 5)
    ours = ddim_sample(eps_model, noise, text, steps=10)
    sched = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(10)
    x = noise
    for t in sched.timesteps:
        x = sched.step(eps_model(x, t.float().expand(2), text), t, x).prev_sample
    assert psnr_db(x.numpy(), ours.numpy()) > 100


def _folder_errors(tmp_path, model):
    """(folder, message) for each kind of bad input."""
    cases = []
    not_model = tmp_path / "not_a_model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello")
    cases.append((not_model, "no config.json"))
    unet = tmp_path / "unet"
    model.save_pretrained(unet)
    cfg = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    cases.append((unet, "is not a family edgecompile imports"))
    sharded = tmp_path / "missing_shard"
    model.save_pretrained(sharded, max_shard_size="50KB")
    next(iter(sorted(sharded.glob("*-of-*.safetensors")))).unlink()
    cases.append((sharded, "missing"))
    mismatch = tmp_path / "mismatch"
    model.save_pretrained(mismatch)
    (mismatch / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    cases.append((mismatch, "do not match"))
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False)
    cases.append((pickled, "pickled weights"))
    return cases


def test_bad_sources_are_one_line_errors_with_exit_2_and_nothing_written(imported, tmp_path, capsys):
    _, model, _, _ = imported
    for folder, message in _folder_errors(tmp_path, model):
        out = tmp_path / f"out_{folder.name}"
        code, _, err = run_cli(["import", str(folder), "-o", str(out)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (folder.name, err)
        assert not out.exists(), folder.name


def test_import_command_summary(imported, tmp_path, capsys):
    _, _, _, root = imported
    code, _, err = run_cli(["import", str(root / "diffusers"), "-o", str(tmp_path / "c"), "--text-len", "9"], capsys)
    assert code == 0 and "epsilon" in err and "learned-sigma" in err  # progress and notes go to stderr
    assert load_checkpoint(tmp_path / "c").config.text_len == 9

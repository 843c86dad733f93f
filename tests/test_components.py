"""The pipeline's other components (issue 26): text encoders rewritten for the Neural Engine equal transformers'
modules, VAE decoders equal diffusers', and the fp16 conversion finds and fixes the overflow each family is known
for (T5's feed-forward, the SDXL VAE's group norms), verified before and after. Tiny random models built here."""

from __future__ import annotations

import pytest
import torch

from edgecompile.coreml.component import convert_with_islands
from edgecompile.deploy.text_encoder import ATTENTION_MASK, INPUT_IDS, POOLED, calibrate_scales, text_encoder_graph
from edgecompile.deploy.vae import IMAGE, Z, VAEDecoderGraph, VAEEncoderGraph
from edgecompile.errors import EdgeCompileError
from edgecompile.metrics import psnr_db

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

T = 8


def t5(act: str = "gated-gelu", overflow: bool = False):
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                              feed_forward_proj=act)).eval()
    if overflow:  # T5's known fp16 trap: the feed-forward output grows past fp16's range
        with torch.no_grad():
            for block in model.encoder.block:
                block.layer[1].DenseReluDense.wo.weight.mul_(3000.0)
    return model


def clip(projection: bool, eos: int = 2):
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=16, projection_dim=24, bos_token_id=0, eos_token_id=eos,
                                           pad_token_id=1)).eval()


def prompts(n: int = 3, mask: bool = True):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 90, (1, T), generator=g, dtype=torch.int32)
        ids[0, 4 + i % 3] = 99  # an end-of-text token
        m = torch.ones(1, T, dtype=torch.int32)
        m[0, 5 + i % 3:] = 0  # padding
        out.append((ids, m) if mask else (ids,))
    return out


def as_btd(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, 0].transpose(1, 2)  # (B, D, 1, T) -> (B, T, D)


@pytest.mark.parametrize("act", ["gated-gelu", "relu"])
def test_t5_encoder_in_ane_layout_equals_transformers_with_padding(act):
    model = t5(act)
    graph = text_encoder_graph(model, T)
    assert graph.input_names == (INPUT_IDS, ATTENTION_MASK)
    for ids, mask in prompts():
        with torch.no_grad():
            want = model(input_ids=ids.long(), attention_mask=mask.long()).last_hidden_state
            got = as_btd(graph(ids, mask))
        assert psnr_db(want.numpy(), got.numpy()) > 100


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("eos", [2, 99])
def test_clip_text_encoder_in_ane_layout_equals_transformers(projection, eos):
    model = clip(projection, eos)
    graph = text_encoder_graph(model, T)
    assert graph.output_names == (("token_level_text_embeddings", POOLED) if projection else ("token_level_text_embeddings",))
    for (ids,) in prompts(mask=False):
        with torch.no_grad():
            want = model(input_ids=ids.long())
            got = graph(ids)
        hidden = got[0] if projection else got
        assert psnr_db(want.last_hidden_state.numpy(), as_btd(hidden).numpy()) > 100
        if projection:  # the pooled token picked as transformers picks it, projected
            assert psnr_db(want.text_embeds.numpy(), got[1].numpy()) > 100


def test_an_unsupported_encoder_class_is_one_line():
    with pytest.raises(EdgeCompileError, match="text encoder class BertModel is not supported"):
        text_encoder_graph(transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                                         intermediate_size=64)), T)


def test_t5_fp16_overflow_is_found_and_fixed_by_exact_rescaling():
    """Plain fp16 of an overflowing T5 fails verification; the fp16 emulation finds the ops; the RMS norms' power-of-two
    rescale (exact) removes the overflow with no fp32 island, and the package verifies."""
    graph = text_encoder_graph(t5(overflow=True), T)
    inputs = prompts()
    _, plain = convert_with_islands(graph, "text_encoder", inputs)
    assert plain.overflowing_ops_without_islands and plain.psnr_without_islands_db < 40  # what fp16 alone computes
    assert plain.passed  # islands (here: the whole encoder in fp32) fix it, at fp32's cost
    scales = calibrate_scales(graph, inputs)
    assert max(scales.values()) > 1 and all(s == 2 ** round(torch.log2(torch.tensor(s)).item()) for s in scales.values())
    _, rescaled = convert_with_islands(graph, "text_encoder", inputs)
    assert not rescaled.overflowing_ops_without_islands and not rescaled.fp32_islands and not rescaled.fp32_everywhere
    assert rescaled.passed and rescaled.psnr_db >= 60


def vae_kl(amplify: float = 1.0):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
                                  scaling_factor=0.13025).eval()
    if amplify != 1.0:  # activations past fp16's range in the decoder's group norms, as the SDXL VAE's
        with torch.no_grad():
            for name, p in vae.decoder.named_parameters():
                if "conv" in name and name.endswith("weight"):
                    p.mul_(amplify)
    return vae


def test_vae_decoder_graph_equals_diffusers_with_the_scaling_inside():
    vae = vae_kl()
    graph = VAEDecoderGraph(vae, (8, 8))
    assert (graph.input_names, graph.output_names) == ((Z,), (IMAGE,))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = vae.decode(z / 0.13025).sample
        assert psnr_db(want.numpy(), graph(z).numpy()) > 120
        enc = VAEEncoderGraph(vae, (16, 16))
        image = torch.rand(1, 3, 16, 16) * 2 - 1
        assert psnr_db((vae.encode(image).latent_dist.mean * 0.13025).numpy(), enc(image).numpy()) > 120


def test_vae_decoder_fp16_overflow_becomes_fp32_islands_and_verifies():
    inputs = [(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)),) for s in range(2)]
    _, ok = convert_with_islands(VAEDecoderGraph(vae_kl(), (8, 8)), "decoder", inputs)
    assert ok.passed and not ok.fp32_islands
    _, fixed = convert_with_islands(VAEDecoderGraph(vae_kl(amplify=8.0), (8, 8)), "decoder", inputs)
    assert fixed.overflowing_ops_without_islands and fixed.psnr_without_islands_db < 40  # fp16 alone breaks the picture
    assert fixed.fp32_islands and not fixed.fp32_everywhere and fixed.passed, fixed.to_dict()
    assert any(op.startswith(("square", "reduce_mean")) for op in fixed.fp32_islands)  # the group norms' statistics


def test_tiny_autoencoder_decoder_converts_and_verifies():
    torch.manual_seed(0)
    tiny = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                                     num_decoder_blocks=(1, 1), latent_channels=4).eval()
    _, result = convert_with_islands(VAEDecoderGraph(tiny, (8, 8)), "decoder", [(torch.randn(1, 4, 8, 8),)])
    assert result.passed and result.psnr_db >= 60


# ---- a whole pipeline: import keeps the parts, export --pipeline compiles them -------------------------------------
WORDS = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "handwritten", "seven", "red", "fox", "in", "the", "snow"]


def tiny_pipeline(root):
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                       cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32).save_pretrained(root / "transformer")
    encoder = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                                feed_forward_proj="gated-gelu"))
    encoder.save_pretrained(root / "text_encoder")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(root / "tokenizer")
    vae_kl().save_pretrained(root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000}')
    (root / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    return encoder


@pytest.fixture(scope="module")
def pipeline_checkpoint(tmp_path_factory):
    from edgecompile.model.importers import import_checkpoint

    root = tmp_path_factory.mktemp("pipe")
    encoder = tiny_pipeline(root / "src")
    import_checkpoint(root / "src", root / "ckpt", text_len=T)
    return root, encoder


def test_import_keeps_the_pipeline_parts(pipeline_checkpoint):
    from edgecompile.model.checkpoint import load_checkpoint

    root, _ = pipeline_checkpoint
    ckpt = load_checkpoint(root / "ckpt")
    assert sorted(ckpt.components) == ["text_encoder", "tokenizer", "vae"]
    assert (root / "ckpt" / "text_encoder" / "model.safetensors").is_file() and (root / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    assert ckpt.provenance["import"]["components"] == ["text_encoder", "tokenizer", "vae"]


def test_export_pipeline_writes_every_component_verified_with_a_manifest(pipeline_checkpoint, tmp_path, capsys):
    import json

    import numpy as np

    from edgecompile.coreml.interpreter import MILInterpreter
    from edgecompile.coreml.package import load_package
    from tests.test_coreml import run_cli

    root, encoder = pipeline_checkpoint
    code, out, err = run_cli(["export", str(root / "ckpt"), "--pipeline", "--img2img", "-o", str(tmp_path / "o"), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)["packages"][0]
    res = tmp_path / "o" / "w1.0" / "Resources"
    assert {p.name for p in res.iterdir()} >= {"MultiModalDiffusionTransformer.mlpackage", "TextEncoder.mlpackage", "VAEDecoder.mlpackage",
                                              "tokenizer.json", "pipeline.json", "denoiser_contract.json", "VAEEncoder.mlpackage"}
    assert [c["kind"] for c in report["components"]] == ["text_encoder", "decoder", "encoder"]
    assert all(c["verify"]["passed"] and c["verify"]["psnr_db"] >= 60 for c in report["components"])
    manifest = json.loads((res / "pipeline.json").read_text())
    assert manifest["components"]["text_encoder"]["inputs"] == {"input_ids": [1, T], "attention_mask": [1, T]}
    assert manifest["components"]["decoder"]["latent_scaling_factor"] == pytest.approx(0.13025)
    assert manifest["scheduler"]["class"] == "DDIMScheduler" and manifest["text_length"] == T
    assert manifest["components"]["encoder"]["outputs"] == {"z": [1, 4, 8, 8]}  # --img2img: image -> the denoiser's latent
    # the text encoder package computes what transformers' module computes for a tokenized, padded prompt
    view = load_package(res / "TextEncoder.mlpackage")
    ids = np.array([[3, 4, 5, 6, 1, 0, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    mask[0, 4] = 1
    got = MILInterpreter(view.program).run({"input_ids": ids, "attention_mask": mask})["token_level_text_embeddings"]
    with torch.no_grad():
        want = encoder.eval()(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state
    assert psnr_db(want.numpy(), got[:, :, 0].transpose(0, 2, 1)) > 60
    assert not any(p.name.endswith(".safetensors") for p in res.iterdir())  # what verification needs stays beside Resources/


def test_pipeline_needs_the_parts_and_says_which_are_missing(tiny_checkpoint, tmp_path, capsys):
    from tests.test_coreml import run_cli
    from tests.test_robustness import one_line_exit_2

    code, _, err = run_cli(["export", str(tiny_checkpoint), "--pipeline", "-o", str(tmp_path / "o")], capsys)
    one_line_exit_2(code, err, "has no text_encoder/, tokenizer/, vae/", "edgecompile import PIPELINE")
    assert not (tmp_path / "o").exists()


def test_bad_pipeline_parts_are_refused_at_import(tmp_path, capsys):
    import json
    import shutil

    from tests.test_coreml import run_cli
    from tests.test_robustness import one_line_exit_2

    src = tmp_path / "src"
    tiny_pipeline(src)
    capsys.readouterr()  # save_pretrained's own progress bars
    cases = {}
    bad = tmp_path / "pickled"
    shutil.copytree(src, bad)
    (bad / "text_encoder" / "model.safetensors").rename(bad / "text_encoder" / "pytorch_model.bin")
    cases[bad] = "pickled weights"
    bad = tmp_path / "tokclass"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "tokenizer" / "tokenizer_config.json").read_text())
    (bad / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "MyOwnTokenizer"}))
    cases[bad] = "tokenizer class 'MyOwnTokenizer' is not supported"
    bad = tmp_path / "encclass"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "text_encoder" / "config.json").read_text())
    (bad / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    cases[bad] = "text encoder class 'BertModel' is not supported"
    for folder, needle in cases.items():
        code, _, err = run_cli(["import", str(folder), "-o", str(tmp_path / f"out_{folder.name}")], capsys)
        one_line_exit_2(code, err, needle)
        assert not (tmp_path / f"out_{folder.name}").exists()


def test_sample_draws_pictures_from_text_through_the_packages(pipeline_checkpoint, tmp_path, capsys):
    """tokenizer -> TextEncoder -> denoiser loop (guidance with the empty prompt, masks carried) -> VAEDecoder, all
    through the packages in fp16 emulation, against the torch pipeline of the checkpoint's own modules from the same noise."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    from tests.test_coreml import run_cli

    root, _ = pipeline_checkpoint
    code, out, err = run_cli(["export", str(root / "ckpt"), "--pipeline", "-o", str(tmp_path / "o"), "--no-verify", "--json"], capsys)
    assert code == 0, err
    res = tmp_path / "o" / "w1.0" / "Resources"
    code, out, err = run_cli(["sample", str(res), "--checkpoint", str(root / "ckpt"), "--prompt", "a red fox", "--prompt", "a photo of a cat",
                              "--compare", "-o", str(tmp_path / "pics.npy"), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    images = np.load(tmp_path / "pics.npy")
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1
    assert summary["final_image_psnr_db"] >= 35 and summary["non_finite_images"] == 0, summary
    assert summary["reference"] == "diffusers' PixArtSigmaPipeline"  # diffusers' own pipeline on the same components
    # edgecompile's torch loop (the sampler the packages run) computes what diffusers' pipeline computes
    from edgecompile.coreml.text_to_image import diffusers_pipeline, load_pipeline, noise_for, tokenize, torch_pipeline
    from edgecompile.model.checkpoint import load_checkpoint

    ckpt, pipe = load_checkpoint(root / "ckpt"), load_pipeline(res)
    texts = ["a red fox", "a photo of a cat"]
    ids, masks = tokenize(pipe.tokenizer, [*texts, ""], T)
    noise = noise_for(ckpt.config, 2, (8, 8), 0, None)
    ours = torch_pipeline(ckpt, pipe, ids, masks, noise, 4, 2.0)
    assert psnr_db(diffusers_pipeline(ckpt, pipe, texts, noise, 4, 2.0), ours) > 90
    # the same noise from a file gives the same pictures; a PNG grid is written too
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"noise": noise}, str(tmp_path / "noise.safetensors"))
    code, _, err = run_cli(["sample", str(res), "--checkpoint", str(root / "ckpt"), "--prompt", "a red fox", "--prompt", "a photo of a cat",
                            "--noise", str(tmp_path / "noise.safetensors"), "-o", str(tmp_path / "grid.png")], capsys)
    assert code == 0 and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG", err
    code, _, err = run_cli(["sample", str(res), "--checkpoint", str(root / "ckpt"), "--prompt", "x", "--noise", str(tmp_path / "noise.safetensors"),
                            "-o", str(tmp_path / "bad.png")], capsys)
    assert code == 2 and "expected (1, 4, 8, 8)" in err and not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("family", ["t5", "clip"])
def test_text_encoder_ships_with_8_bit_palettes_verified_against_their_simulation(tmp_path, family):
    """The text encoder's default: 8-bit LUTs (plain k-means) on every layer large enough, written as LUT ops, verified
    against the simulation (decoded weights) at the 60 dB bar and reported against the unquantized encoder."""
    import copy

    from edgecompile.compress.palettize_model import palettize_deploy, uniform_bits
    from edgecompile.commands.pipeline import unquantized_psnr

    torch.manual_seed(0)
    if family == "t5":
        model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                                                  feed_forward_proj="gated-gelu")).eval()
    else:  # every projection above the palettization threshold, q's 1/sqrt(d) included
        model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
            projection_dim=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    graph = text_encoder_graph(model, T)
    inputs = prompts(mask=family == "t5")
    simulation = copy.deepcopy(graph)
    palettes = palettize_deploy(simulation, uniform_bits(simulation, 8))
    assert palettes and all(p.nbits == 8 for p in palettes.values())
    ml, result = convert_with_islands(simulation, "text_encoder", inputs, palettes=palettes)
    luts = [o for o in ml._mil_program.functions["main"].operations if o.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == len(palettes)
    assert result.passed and result.psnr_db >= 60
    assert 30 < unquantized_psnr(graph, simulation, inputs) < 100  # 8 bits change the output, a little


def test_bench_estimates_each_component_and_the_whole_generation(pipeline_checkpoint, tmp_path, capsys):
    import json

    from tests.test_coreml import run_cli

    root, _ = pipeline_checkpoint
    code, _, err = run_cli(["export", str(root / "ckpt"), "--pipeline", "--no-verify", "-o", str(tmp_path / "o")], capsys)
    assert code == 0, err
    code, out, err = run_cli(["bench", str(tmp_path / "o" / "w1.0" / "Resources"), "--no-host", "--steps", "4", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    kinds = {r["kind"]: r for r in data["items"]}
    assert set(kinds) == {"text_encoder", "denoiser", "decoder"}
    assert (kinds["denoiser"]["calls_per_image"], kinds["text_encoder"]["calls_per_image"], kinds["decoder"]["calls_per_image"]) == (8, 2, 1)
    assert all(r["static"]["total_macs"] > 0 for r in data["items"])  # the components' work, read off their programs
    for device, total in data["generation_ms"].items():
        assert total == pytest.approx(sum(r["per_image_ms"][device] for r in data["items"]), rel=1e-6)


def test_a_text_encoder_in_chunks_runs_as_a_chain(pipeline_checkpoint, tmp_path, capsys):
    """--text-encoder-chunks 2 (what T5-XXL's 4.7B parameters need at 3): the T5 encoder in two packages, each
    verified on the hidden states handed over, named in pipeline.json, and run as a chain by sample."""
    import json

    from tests.test_coreml import run_cli

    root, _ = pipeline_checkpoint
    code, out, err = run_cli(["export", str(root / "ckpt"), "--pipeline", "--text-encoder-chunks", "2", "--no-generate", "-o", str(tmp_path / "o"),
                              "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)["packages"][0]
    chunks = [c for c in report["components"] if c["kind"] == "text_encoder"]
    assert [c["package"] for c in chunks] == ["TextEncoderChunk1.mlpackage", "TextEncoderChunk2.mlpackage"]
    assert all(c["verify"]["passed"] for c in chunks) and chunks[1]["inputs"] == {"text_encoder_hidden_states": [1, 32, 1, T],
                                                                                   "attention_mask": [1, T]}
    res = tmp_path / "o" / "w1.0" / "Resources"
    manifest = json.loads((res / "pipeline.json").read_text())
    assert manifest["components"]["text_encoder"]["chunks"] == ["TextEncoderChunk1.mlpackage", "TextEncoderChunk2.mlpackage"]
    code, out, err = run_cli(["sample", str(res), "--checkpoint", str(root / "ckpt"), "--prompt", "a red fox", "--compare",
                              "-o", str(tmp_path / "fox.npy"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["final_image_psnr_db"] >= 35
    code, _, err = run_cli(["export", str(root / "ckpt"), "--pipeline", "--text-encoder-chunks", "3", "-o", str(tmp_path / "bad")], capsys)
    assert code == 2 and "has 2 blocks: give 1..2" in err and not (tmp_path / "bad").exists()

"""Pipeline components at real sizes, random weights of the published configs (nothing is downloaded): each is
rewritten, converted to fp16 with its overflowing ops found and kept in fp32, and verified against its fp32 torch
graph in the interpreter's fp16 emulation. Each section runs in a child process, so its peak RSS is its own.

    clip_l    CLIP ViT-L/14's text encoder (123M), 77 tokens, 8-bit LUTs (the text encoder's default)
    sdxl_vae  the SDXL VAE decoder (49.5M) at --latent (128 = 1024x1024 pixels)

T5-XXL's encoder (4.7B parameters, 19 GB in fp32 before any conversion) does not fit this 24 GiB machine with its
conversion; it is not run here.

    python benchmarks/pipeline_scale.py [--sections clip_l,sdxl_vae] [--latent 128] [--output benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_gib, write_result


def clip_l(_latent: int) -> dict:
    import torch
    import transformers

    from edgecompile.coreml.component import convert_with_islands
    from edgecompile.compress.palettize_model import palettize_deploy, uniform_bits
    from edgecompile.commands.pipeline import unquantized_psnr
    from edgecompile.deploy.text_encoder import text_encoder_graph

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    start = time.perf_counter()
    graph = text_encoder_graph(model, 77)
    g = torch.Generator().manual_seed(1)
    inputs = []
    for n in (5, 20, 76):
        ids = torch.full((1, 77), 49407, dtype=torch.int32)
        ids[0, :n] = torch.randint(0, 49400, (n,), generator=g, dtype=torch.int32)
        inputs.append((ids,))
    simulation = copy.deepcopy(graph)
    palettes = palettize_deploy(simulation, uniform_bits(simulation, 8))
    ml, result = convert_with_islands(simulation, "text_encoder", inputs, palettes=palettes)
    seconds = time.perf_counter() - start
    result.bits, result.psnr_vs_unquantized_db = 8, unquantized_psnr(graph, simulation, inputs)
    with tempfile.TemporaryDirectory() as d:
        ml.save(f"{d}/TextEncoder.mlpackage")
        size = sum(f.stat().st_size for f in Path(f"{d}/TextEncoder.mlpackage").rglob("*") if f.is_file())
    return {"params": sum(p.numel() for p in model.parameters()), "tokens": 77, "palettized_layers": len(palettes),
            "convert_and_verify_seconds": round(seconds, 1), "package_bytes": size, **result.to_dict()}


def sdxl_vae(latent: int) -> dict:
    import diffusers
    import torch

    from edgecompile.coreml.component import convert_with_islands
    from edgecompile.deploy.vae import VAEDecoderGraph

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  latent_channels=4, norm_num_groups=32, scaling_factor=0.13025).eval()
    start = time.perf_counter()
    decoder = VAEDecoderGraph(vae, (latent, latent))
    g = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(1, 4, latent, latent, generator=g),)]
    ml, result = convert_with_islands(decoder, "decoder", inputs)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as d:
        ml.save(f"{d}/VAEDecoder.mlpackage")
        size = sum(f.stat().st_size for f in Path(f"{d}/VAEDecoder.mlpackage").rglob("*") if f.is_file())
    return {"params": sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters()),
            "latent": [latent, latent], "image": [latent * 8, latent * 8], "convert_and_verify_seconds": round(seconds, 1),
            "package_bytes": size, **result.to_dict()}


SECTIONS = {"clip_l": clip_l, "sdxl_vae": sdxl_vae}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="clip_l,sdxl_vae")
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one section, in this process; prints its result as JSON
        result = SECTIONS[args.child](args.latent)
        result["peak_rss_gib"] = round(peak_rss_gib(), 2)
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return
    data = {}
    for name in args.sections.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--latent", str(args.latent)], capture_output=True, text=True)
        line = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        data[name] = json.loads(line[7:]) if line else {"failed": proc.stderr.strip().splitlines()[-3:]}
        print(name, json.dumps(data[name], indent=1)[:1500], flush=True)
    data["t5_xxl"] = {"skipped": "4.7B parameters (19 GB in fp32) with its conversion do not fit this 24 GiB machine"}
    write_result("pipeline_scale", data, args.output)


if __name__ == "__main__":
    main()

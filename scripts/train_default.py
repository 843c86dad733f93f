"""Train the bundled default checkpoint: the toy elastic supernetwork (recipes/toy.yaml) on scikit-learn's digits.

    python scripts/train_default.py [--stage all|dit|components] [--steps 2600] [--sizes 8x8,16x16] [--seed 0]
                                    [-o edgecompile/checkpoints/default]

Elastic training as in SnapGen++ §3.2 (edgecompile.model.train), at two latent sizes in turn: the 8x8 digits
(batch 64) and the same digits bilinearly upsampled to 16x16 (batch 12), so that one checkpoint serves
multi-resolution packages. About 40 minutes on 2 CPU cores.
Afterwards it generates samples at every width and size and scores them with a classifier trained on the real
digits (16x16 samples area-averaged to 8x8), writing the accuracies into the checkpoint's provenance and
benchmarks/results/default_model_quality.json.

`--stage components` (run after the DiT, or on its own over a trained checkpoint: a few minutes) trains the rest of
the text-to-image pipeline around the denoiser (edgecompile.model.train_components): the tokenizer, a tiny CLIP
text encoder distilled onto the DiT's conditioning, and a tiny AutoencoderKL between the 8x8 latents and 32x32 RGB
pictures; it scores text -> picture at every width (the digit classifier on the decoded pictures, held-out
phrasings) and writes text_encoder/, tokenizer/ and vae/ into the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecompile import __version__  # noqa: E402
from edgecompile.model.checkpoint import Prompts, save_checkpoint  # noqa: E402
from edgecompile.model.config import ModelConfig, width_label  # noqa: E402
from edgecompile.model.digits import N_CLASSES, digits_dataset, sample_accuracy, train_classifier  # noqa: E402
from edgecompile.model.dit import EfficientDiT  # noqa: E402
from edgecompile.model.train import ClassTokens, Resolution, TrainSettings, train_elastic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "recipes" / "toy.yaml"))
    ap.add_argument("--steps", type=int, default=2600)
    ap.add_argument("--sizes", default="8x8,16x16", help="latent sizes trained in turn")
    ap.add_argument("--batch-sizes", default="64,12", help="one batch per size (16x16 steps cost 1.5x the 8x8 ones on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=str(ROOT / "edgecompile" / "checkpoints" / "default"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "default_model_quality.json"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--stage", choices=("all", "dit", "components"), default="all")
    ap.add_argument("--encoder-steps", type=int, default=1500, help="text encoder steps (about 12 ms each)")
    ap.add_argument("--autoencoder-steps", type=int, default=600, help="autoencoder steps (about 1 s each on 2 cores)")
    args = ap.parse_args()
    if args.stage != "components":
        train_dit(args)
    if args.stage != "dit":
        train_parts(args)


def train_dit(args) -> None:

    torch.manual_seed(args.seed)
    config = ModelConfig.load(args.config)
    model = EfficientDiT(config)
    tokens = ClassTokens(N_CLASSES, config.text_len, config.text_dim)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    for size in sizes:
        config.check_latent_size(*size)
    _, labels = digits_dataset()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if len(batches) != len(sizes):
        sys.exit(f"--batch-sizes needs one batch per size ({len(sizes)})")
    resolutions = [Resolution(digits_dataset(size)[0], b) for size, b in zip(sizes, batches)]
    settings = TrainSettings(steps=args.steps, batch_size=batches[0], seed=args.seed)
    start = time.time()
    ema_model, ema_tokens, history = train_elastic(model, tokens, resolutions, labels, settings)
    train_s = time.time() - start

    # Evaluate the weights as stored (fp16), exactly what users get.
    ema_model = ema_model.half().float().eval()
    table = ema_tokens.table.detach()
    prompts = Prompts(tokens=table[:N_CLASSES], null=table[N_CLASSES:], labels=[str(i) for i in range(N_CLASSES)])
    clf = train_classifier(args.seed)
    quality = {}
    for w in config.widths:
        for size in sizes:
            row = {}
            for steps in (4, 20):
                acc, _ = sample_accuracy(lambda x, t, c, w=w: ema_model(x, t, c, width=w), prompts, clf, steps=steps, latent_hw=size)
                row[f"accuracy_{steps}_steps"] = acc
            quality.setdefault(width_label(w), {})[f"{size[0]}x{size[1]}"] = row
            print(f"width {width_label(w)} at {size[0]}x{size[1]}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)

    provenance = {
        "script": "scripts/train_default.py", "seed": args.seed, "steps": history["steps_done"],
        "latent_sizes": [list(size) for size in sizes],
        "batch_sizes": [r.batch_size for r in resolutions], "train_seconds": round(train_s, 1), "data": "sklearn.datasets.load_digits",
        "edgecompile": __version__, "torch": torch.__version__, "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "final_losses": {k: history[k][-1] for k in ("loss_full", "loss_sub", "loss_dist")},
        "sample_accuracy": quality,
        "sampling": "Euler, CFG 2.0, 20 samples per class, noise seed 0, SVC trained on the real digits",
    }
    save_checkpoint(ema_model, args.output, dtype="float16", prompts=prompts, provenance=provenance, force=args.force)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"provenance": provenance, "history": history}, indent=1) + "\n")
    print(f"saved {args.output} ({train_s / 60:.1f} min of training)")


def train_parts(args) -> None:
    import tempfile

    from edgecompile.model.checkpoint import load_checkpoint
    from edgecompile.model.components import check_folders
    from edgecompile.model.train_components import (autoencoder_model, build_tokenizer, save_tokenizer, text_encoder_model,
                                                    train_autoencoder, train_text_encoder)

    ckpt = load_checkpoint(args.output)
    config, prompts = ckpt.config, ckpt.prompts
    tokenizer = build_tokenizer()
    encoder = text_encoder_model(config.text_dim, config.text_len)
    fit_text = train_text_encoder(encoder, tokenizer, prompts.tokens, prompts.null, steps=args.encoder_steps, seed=args.seed)
    print(f"text encoder: train mse {fit_text.train_mse:.2e}, held-out phrasings {fit_text.held_out_mse:.2e}, {fit_text.seconds:.0f} s")
    vae = autoencoder_model()
    fit_vae = train_autoencoder(vae, steps=args.autoencoder_steps, seed=args.seed)
    print(f"autoencoder: decoder {fit_vae.decoder_psnr_db:.1f} dB on the true latents, encoder mse {fit_vae.encoder_mse:.2e}, "
          f"{fit_vae.seconds:.0f} s")
    quality = text_to_picture_accuracy(ckpt, encoder, tokenizer, vae, args.seed)
    provenance = dict(ckpt.provenance)
    provenance["components"] = {
        "script": "scripts/train_default.py --stage components", "module": "edgecompile.model.train_components",
        "text_encoder": {"class": "CLIPTextModel", "steps": fit_text.steps, "train_mse": fit_text.train_mse,
                         "held_out_phrasings_mse": fit_text.held_out_mse, "seconds": round(fit_text.seconds, 1)},
        "vae": {"class": "AutoencoderKL", "steps": fit_vae.steps, "decoder_psnr_db": round(fit_vae.decoder_psnr_db, 2),
                "encoder_mse": fit_vae.encoder_mse, "seconds": round(fit_vae.seconds, 1)},
        "text_to_picture_accuracy": quality,
        "sampling": "Euler, CFG 2.0, 4 steps, 20 samples per digit over its held-out phrasings, noise seed 0, the digits' SVC on the "
                    "decoded 32x32 pictures area-averaged to 8x8",
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
        save_tokenizer(tmp / "tokenizer")
        vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        save_checkpoint(ckpt.model, args.output, dtype=ckpt.dtype, prompts=prompts, provenance=provenance, force=True,
                        components=check_folders(tmp))
    results = Path(args.results)
    data = json.loads(results.read_text()) if results.is_file() else {}
    data["provenance"] = provenance
    results.write_text(json.dumps(data, indent=1) + "\n")
    print(f"saved the pipeline parts into {args.output}")


@torch.no_grad()
def text_to_picture_accuracy(ckpt, encoder, tokenizer, vae, seed: int) -> dict:
    """Prompt -> picture in torch at every width: held-out phrasings through the encoder, 4 Euler steps, decoded,
    classified from the picture."""
    from edgecompile.model.digits import classify
    from edgecompile.model.elastic import extract_width
    from edgecompile.model.sampling import euler_sample
    from edgecompile.model.train_components import encode_ids, held_out_phrasings, picture_latents

    per_class = 20
    texts = [held_out_phrasings(c)[i % 3] for c in range(N_CLASSES) for i in range(per_class)]
    labels = torch.arange(N_CLASSES).repeat_interleave(per_class).numpy()
    cond = encoder(input_ids=encode_ids(tokenizer, texts, ckpt.config.text_len)).last_hidden_state
    null = encoder(input_ids=encode_ids(tokenizer, [""], ckpt.config.text_len)).last_hidden_state
    noise = torch.randn((len(texts), ckpt.config.latent_channels, 8, 8), generator=torch.Generator().manual_seed(seed))
    out = {}
    for w in ckpt.config.widths:
        model = extract_width(ckpt.model, w, share=True).eval()
        latents = euler_sample(model, noise, cond, steps=4, cfg_scale=2.0, null_text=null)
        pictures = torch.cat([vae.decode(latents[i : i + 100]).sample for i in range(0, len(latents), 100)])
        acc = float((classify(train_classifier(seed), picture_latents(pictures)) == labels).mean())
        latent_acc = float((classify(train_classifier(seed), latents) == labels).mean())
        out[width_label(w)] = {"picture_accuracy": acc, "latent_accuracy": latent_acc}
        print(f"width {width_label(w)}: text -> picture accuracy {acc:.3f} (of the latents {latent_acc:.3f})", flush=True)
    return out


if __name__ == "__main__":
    main()

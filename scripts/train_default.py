"""Train the bundled default checkpoint: the toy elastic supernetwork (recipes/toy.yaml) on scikit-learn's digits.

    python scripts/train_default.py [--steps 3000] [--sizes 8x8,16x16] [--seed 0] [-o edgecompile/checkpoints/default]

Elastic training as in SnapGen++ §3.2 (edgecompile.model.train), at two latent sizes in turn: the 8x8 digits
(batch 64) and the same digits bilinearly upsampled to 16x16 (batch 12), so that one checkpoint serves
multi-resolution packages. About 40 minutes on 2 CPU cores.
Afterwards it generates samples at every width and size and scores them with a classifier trained on the real
digits (16x16 samples area-averaged to 8x8), writing the accuracies into the checkpoint's provenance and
benchmarks/results/default_model_quality.json.
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
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()

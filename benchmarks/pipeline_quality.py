"""Prompt to picture through the packages: the bundled default pipeline (tokenizer -> CLIP text encoder -> elastic
DiT -> AutoencoderKL decoder) exported with `export --pipeline` at every width, sampled from text, judged.

    python benchmarks/pipeline_quality.py [--widths 0.375,0.5,1.0] [--bits mixed] [--per-digit 5] [--workdir DIR]

For each width: `edgecompile export --width W --bits B --pipeline` (a child process; the export's own
self-distillation budget), then `text_to_image` (edgecompile.coreml.text_to_image) over prompts the text encoder
never saw in training ("A picture of the digit Seven.", "hand-written 7", "an image of a seven"), --per-digit
images of each digit, 4 Euler steps, CFG 2, noise seed 0, every package run as the app runs it (the MIL
interpreter in fp16 on Linux, Core ML on macOS). Reported per width: the share of decoded 32x32 pictures that the
digits' classifier (an SVM on the real digits, reading the picture's ink area-averaged to 8x8) reads as the digit
asked for, the same through the torch pipeline from the same noise, and the final-image PSNR between the two.
Results: benchmarks/results/pipeline_quality.json and pipeline_digits.png (one picture of each digit at width 0.5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch

from edgecompile.coreml.text_to_image import load_pipeline, save_images, text_to_image
from edgecompile.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from edgecompile.model.digits import N_CLASSES, classify, train_classifier
from edgecompile.model.train_components import held_out_phrasings, picture_latents

EDGECOMPILE = [sys.executable, "-m", "edgecompile"]


def picture_accuracy(clf, images: np.ndarray, labels: np.ndarray) -> float:
    """(N, H, W, 3) in [0, 1] -> the share classified as their digit."""
    pictures = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    return float((classify(clf, picture_latents(pictures)) == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="0.375,0.5,1.0")
    ap.add_argument("--bits", default="mixed")
    ap.add_argument("--per-digit", type=int, default=5)
    ap.add_argument("--workdir")
    ap.add_argument("--reuse", action="store_true", help="keep an export already in --workdir (one that verified) instead of redoing it")
    ap.add_argument("--output")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgecompile-pipeline-"))
    output = Path(args.output) if args.output else _common.RESULTS
    output.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    clf = train_classifier(0)
    prompts = [held_out_phrasings(d)[i % 3] for d in range(N_CLASSES) for i in range(args.per_digit)]
    labels = np.repeat(np.arange(N_CLASSES), args.per_digit)
    rows = []
    for width in args.widths.split(","):
        out = work / f"w{width}"
        if args.reuse and (out / f"w{width}" / "Resources" / "pipeline.json").is_file():
            step = {"cmd": "reused from --workdir", "rc": 0}
        else:
            step = _common.run_child(EDGECOMPILE + ["export", "--width", width, "--bits", args.bits, "--pipeline", "-o", str(out), "--force",
                                                    "--no-generate"])
        row = {"width": float(width), **_common.export_summary(step, out, width)}
        if step["rc"] == 0:
            import json

            report = json.loads((out / f"w{width}" / "report.json").read_text())
            row["components"] = [{"kind": c["kind"], "class": c["source_class"], "verify_psnr_db": c["verify"]["psnr_db"],
                                  "bits": c["verify"].get("bits"), "seconds": c["seconds"]} for c in report.get("components", [])]
            resources = out / f"w{width}" / "Resources"
            start = time.perf_counter()
            result = text_to_image(load_pipeline(resources), ckpt, prompts, steps=4, cfg_scale=2.0, seed=0, compare=True)
            row.update(images=len(prompts), sample_seconds=round(time.perf_counter() - start, 1), runtime=result.runtime,
                       package_accuracy=picture_accuracy(clf, result.images, labels),
                       torch_pipeline_accuracy=picture_accuracy(clf, result.reference, labels),
                       final_image_psnr_db=round(result.psnr_db, 2), non_finite_images=int((~np.isfinite(result.images)).sum()))
            if width == "0.5":
                first = [d * args.per_digit for d in range(N_CLASSES)]
                save_images(result.images[first], [prompts[i] for i in first], output / "pipeline_digits.png",
                            f"edgecompile export --width 0.5 --bits {args.bits} --pipeline; sample from text through the packages "
                            f"({result.runtime}, 4 steps, CFG 2)")
        rows.append(row)
        print({k: row.get(k) for k in ("width", "package_accuracy", "torch_pipeline_accuracy", "final_image_psnr_db", "sample_seconds")},
              flush=True)
    path = _common.write_result("pipeline_quality", {
        "what": "text -> picture through the packages of `export --pipeline` (tokenizer, TextEncoder, denoiser, VAEDecoder), held-out "
                "phrasings, 4 Euler steps, CFG 2, noise seed 0; accuracy = the digits' SVM on the decoded pictures",
        "bits": args.bits, "per_digit": args.per_digit, "rows": rows}, output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

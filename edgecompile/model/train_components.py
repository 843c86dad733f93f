"""The bundled default's other pipeline parts (scripts/train_default.py --stage components): a tiny text encoder
with its tokenizer and a tiny autoencoder, trained to fit the already-trained denoiser, so that the default
checkpoint is a whole text-to-image pipeline:

    "a handwritten 7"  -> tokenizer.json (word level, 14 words) -> CLIPTextModel (2 layers, 32 wide) -> (4, 32)
                       -> the elastic DiT on (1, 8, 8) latents -> AutoencoderKL decoder -> (3, 32, 32) RGB picture

Why this shape:
- The latent space is the one the DiT was trained on (the 8x8 digits in [-1, 1]): the decoder is trained on those
  latents (the DiT's own samples land there), and the encoder is trained to map each picture back onto its latent,
  so `vae.encode` -> DiT -> `vae.decode` is consistent (image-to-image) without retraining the DiT.
- The text encoder is a transformers CLIPTextModel (the paper's app runs TinyCLIP), distilled onto the DiT's
  learned conditioning: for every prompt of a digit it must produce that digit's (T, D) token sequence, and for the
  empty prompt the unconditional one (the CFG branch). The tokenizer's normalizer maps the phrasings of a digit onto
  one word ("a handwritten 7", "the digit seven", "Seven" -> "seven"), which is what lets a 2-layer encoder with
  causal attention reproduce the sequence exactly: every phrasing reaches the encoder as the same token ids.
- Pictures are dark ink on paper in colour (`PAPER`, `INK`), upsampled from the 8x8 digits: `ink_of` inverts the
  colouring, so the digits' classifier judges decoded pictures (area-averaged back to 8x8) as it judges latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecompile.model.digits import N_CLASSES, digits_dataset

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCABULARY = ("<pad>", "<unk>", *NUMBER_WORDS)  # the ids the encoder's embedding table has rows for
FILLER_WORDS = ("a", "an", "the", "handwritten", "hand-written", "digit", "number", "numeral", "picture", "drawing", "image",
                "photo", "of", "written", "by", "hand")
PAPER = (0.96, 0.93, 0.84)  # RGB of the background
INK = (0.10, 0.18, 0.55)  # RGB of a full stroke
IMAGE_SIZE = 32  # pictures are 32x32 from 8x8 latents: the decoder upsamples 4x


def build_tokenizer():
    """A word-level tokenizers.Tokenizer: lower-cased, digits spelled out, filler words dropped, unknown words <unk>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token="<unk>"))
    steps = [normalizers.Lowercase()]
    steps += [normalizers.Replace(str(d), f" {w} ") for d, w in enumerate(NUMBER_WORDS)]
    steps += [normalizers.Replace(Regex(r"[^a-z<>\- ]"), " "),  # punctuation
              normalizers.Replace(Regex(r"\b(" + "|".join(FILLER_WORDS) + r")\b"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def save_tokenizer(folder: Path) -> None:
    """tokenizer/ as transformers saves a fast tokenizer (tokenizer.json + tokenizer_config.json)."""
    import transformers

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def prompt_phrasings(digit: int) -> list[str]:
    """Phrasings of one digit used in training (and a held-out set in evaluation: `held_out_phrasings`)."""
    w, d = NUMBER_WORDS[digit], str(digit)
    return [w, d, f"a {w}", f"a {d}", f"the digit {w}", f"a handwritten {d}", f"a handwritten {w}", f"number {w}", f"the number {d}"]


def held_out_phrasings(digit: int) -> list[str]:
    w, d = NUMBER_WORDS[digit], str(digit)
    return [f"A picture of the digit {w.capitalize()}.", f"hand-written {d}", f"an image of a {w}"]


def text_encoder_model(text_dim: int, text_len: int):
    """The tiny CLIP text transformer: causal, absolute positions, final layer norm (as TinyCLIP's)."""
    import transformers

    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(VOCABULARY), hidden_size=text_dim, intermediate_size=4 * text_dim, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=text_len, projection_dim=text_dim, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def encode_ids(tokenizer, prompts: list[str], text_len: int) -> torch.Tensor:
    """(N, T) ids, padded with <pad> (id 0) or cut to the text length: what coreml/text_to_image.tokenize feeds."""
    rows = []
    for p in prompts:
        ids = tokenizer.encode(p).ids[:text_len]
        rows.append(ids + [0] * (text_len - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class EncoderFit:
    steps: int
    train_mse: float
    held_out_mse: float
    seconds: float


def train_text_encoder(encoder, tokenizer, tokens: torch.Tensor, null: torch.Tensor, steps: int = 1500, lr: float = 3e-3,
                       seed: int = 0, log=print) -> EncoderFit:
    """Fit the encoder's last hidden state to the DiT's conditioning: every phrasing of digit c -> tokens[c] (T, D),
    the empty prompt -> null (T, D)."""
    import time

    torch.manual_seed(seed)
    text_len = tokens.shape[1]
    prompts, targets = [""], [null[0]]
    for c in range(N_CLASSES):
        for p in prompt_phrasings(c):
            prompts.append(p)
            targets.append(tokens[c])
    ids, want = encode_ids(tokenizer, prompts, text_len), torch.stack(targets)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    start = time.perf_counter()
    encoder.train()
    loss = torch.zeros(())
    for step in range(steps):
        loss = F.mse_loss(encoder(input_ids=ids).last_hidden_state, want)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"text encoder step {step:5d}  mse {loss.item():.2e}")
    encoder.eval()
    held = [p for c in range(N_CLASSES) for p in held_out_phrasings(c)]
    held_want = torch.stack([tokens[c] for c in range(N_CLASSES) for _ in held_out_phrasings(c)])
    with torch.no_grad():
        held_mse = F.mse_loss(encoder(input_ids=encode_ids(tokenizer, held, text_len)).last_hidden_state, held_want).item()
    return EncoderFit(steps=steps, train_mse=loss.item(), held_out_mse=held_mse, seconds=time.perf_counter() - start)


def colour(ink: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) ink in [0, 1] -> (N, 3, H, W) RGB picture in [-1, 1] (the decoder's range)."""
    paper = torch.tensor(PAPER).view(1, 3, 1, 1)
    pen = torch.tensor(INK).view(1, 3, 1, 1)
    return (paper + (pen - paper) * ink) * 2 - 1


def ink_of(images: torch.Tensor) -> torch.Tensor:
    """The inverse of `colour`: (N, 3, H, W) in [-1, 1] -> (N, 1, H, W) ink, the least-squares fit per pixel."""
    paper = torch.tensor(PAPER).view(1, 3, 1, 1)
    d = torch.tensor(INK).view(1, 3, 1, 1) - paper
    return (((images + 1) / 2 - paper) * d).sum(1, keepdim=True) / (d * d).sum()


def digit_pictures() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (N, 1, 8, 8) in [-1, 1], pictures (N, 3, 32, 32) in [-1, 1], labels): each 8x8 digit upsampled
    (bicubic), its strokes sharpened, coloured."""
    latents, labels = digits_dataset()
    ink = F.interpolate((latents + 1) / 2, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    ink = torch.sigmoid((ink - 0.45) * 10)  # crisper strokes than the blurred upsampling
    return latents, colour(ink), labels


def picture_latents(images: torch.Tensor) -> torch.Tensor:
    """Decoded pictures -> (N, 1, 8, 8) in [-1, 1] as the digits' classifier reads them (model/digits.classify)."""
    ink = F.adaptive_avg_pool2d(ink_of(images).clamp(0, 1), (8, 8))
    return ink * 2 - 1


def autoencoder_model():
    """diffusers AutoencoderKL, 3 blocks (two 2x downsamplings: 32x32 <-> 8x8), one latent channel, no scaling."""
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                   up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                                   latent_channels=1, norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0)


@dataclass
class AutoencoderFit:
    steps: int
    decoder_psnr_db: float  # decode(the true latents) against the pictures, all digits
    encoder_mse: float  # encode(pictures) against the true latents
    seconds: float


def train_autoencoder(vae, steps: int = 1500, batch: int = 64, lr: float = 2e-3, latent_noise: float = 0.05, seed: int = 0,
                      log=print) -> AutoencoderFit:
    """The decoder learns latent -> picture on the DiT's latents (jittered by `latent_noise`, as samples are not
    exact); the encoder learns picture -> the posterior mean at the true latent."""
    import time

    from edgecompile.metrics import psnr_db

    latents, pictures, _ = digit_pictures()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    start = time.perf_counter()
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z, x = latents[idx], pictures[idx]
        rec = vae.decode(z + latent_noise * torch.randn(z.shape, generator=g)).sample
        mean = vae.encode(x).latent_dist.mean
        loss_dec, loss_enc = F.mse_loss(rec, x), F.mse_loss(mean, z)
        opt.zero_grad(set_to_none=True)
        (loss_dec + loss_enc).backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"autoencoder step {step:5d}  decoder {loss_dec.item():.2e}  encoder {loss_enc.item():.2e}")
    vae.eval()
    with torch.no_grad():
        rec = torch.cat([vae.decode(latents[i : i + 256]).sample for i in range(0, len(latents), 256)])
        enc = torch.cat([vae.encode(pictures[i : i + 256]).latent_dist.mean for i in range(0, len(latents), 256)])
    return AutoencoderFit(steps=steps, decoder_psnr_db=psnr_db(pictures.numpy(), rec.numpy()), encoder_mse=F.mse_loss(enc, latents).item(),
                          seconds=time.perf_counter() - start)

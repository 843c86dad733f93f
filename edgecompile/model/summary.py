"""What `edgecompile info` reports about a config or checkpoint: parameters, weight bytes, attention widths and
tokens per stage of every elastic width, at a latent size."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgecompile.model.checkpoint import Checkpoint
from edgecompile.model.config import ModelConfig, width_label
from edgecompile.model.elastic import count_params


@dataclass
class WidthSummary:
    params: int
    weight_bytes_fp16: int
    weight_bytes_fp32: int
    hidden: int
    heads: int
    kv_heads: int
    tokens: dict[str, int]  # per stage: down, middle, up


@dataclass
class ModelSummary:
    config: str
    source: str
    latent: list[int]
    token_grid: list[int]
    middle_grid: list[int]
    widths: dict[str, WidthSummary]  # by width label
    checkpoint: dict | None = None  # dtype and provenance of a checkpoint

    @property
    def tokens(self) -> dict[str, int]:
        return next(iter(self.widths.values())).tokens

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.checkpoint is None:
            del d["checkpoint"]
        return d


def summarize(config: ModelConfig, ckpt: Checkpoint | None, source: str | None, latent_hw: tuple[int, int] | None = None) -> ModelSummary:
    size = tuple(latent_hw or config.sample_size)
    config.check_latent_size(*size)
    h, w = config.token_grid(*size)
    mh, mw = config.middle_grid(*size)
    tokens = {"down": h * w, "middle": mh * mw, "up": h * w}
    widths = {}
    for wd in config.widths:
        n, d = count_params(config, wd), config.dims(wd)
        widths[width_label(wd)] = WidthSummary(params=n, weight_bytes_fp16=2 * n, weight_bytes_fp32=4 * n, hidden=d.hidden,
                                               heads=d.heads, kv_heads=d.kv_heads, tokens=dict(tokens))
    return ModelSummary(config=config.name, source=str(ckpt.path) if ckpt else str(source), latent=list(size), token_grid=[h, w],
                        middle_grid=[mh, mw], widths=widths,
                        checkpoint={"dtype": ckpt.dtype, "provenance": ckpt.provenance} if ckpt is not None else None)

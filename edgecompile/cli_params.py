"""The CLI's parameter types and parsers: numbers within bounds, choices over edgecompile's enums, options whose
old spellings still work unseen, latent sizes and comma lists. Each failure is a one-line usage error."""

from __future__ import annotations

import math

import click

from edgecompile.errors import EdgeCompileError


class Number(click.ParamType):
    """A finite int or float within bounds; anything else is a one-line usage error naming the option."""

    def __init__(self, kind: type = float, min: float | None = None, max: float | None = None, min_open: bool = False):
        self.kind, self.min, self.max, self.min_open = kind, min, max, min_open
        self.name = "integer" if kind is int else "number"

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a{'' if self.kind is int else ' finite'} {'whole number' if self.kind is int else 'number'}", param, ctx)
        if self.kind is float and not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (v < self.min or (self.min_open and v == self.min)):
            self.fail(f"{value} must be {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        if self.max is not None and v > self.max:
            self.fail(f"{value} must be <= {self.max:g}", param, ctx)
        return v


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
POSITIVE_INT = Number(int, min=1)
NON_NEGATIVE_INT = Number(int, min=0)
SEED = Number(int, min=0, max=MAX_SEED)
FINITE = Number(float)
WIDTH = Number(float, min=0, max=1, min_open=True)


def choice(kind) -> click.Choice:
    """A click choice over one of edgecompile's enums (edgecompile/choices.py): the values are defined once."""
    return click.Choice(kind.values())


class AliasedOption(click.Option):
    """An option with old spellings that still work but are not shown in --help (kept for a release)."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases
        self.opts = [*self.opts, *hidden_aliases]

    def get_help_record(self, ctx):
        shown = self.opts
        self.opts = [o for o in shown if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def parse_latent(text: str | None, option: str = "--latent") -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EdgeCompileError(f"{option} {text!r} is not HxW (e.g. {option} 8x8 or {option} 128x96)") from None
    if h < 1 or w < 1:
        raise EdgeCompileError(f"{option} {text!r} must have positive sides (e.g. {option} 8x8)")
    return h, w


def parse_latents(text: str | None) -> list[tuple[int, int]]:
    """--latent A[,B,...]: one size, or several for one multifunction package (the first is the default function)."""
    if text is None:
        return [None]
    return [parse_latent(part.strip()) for part in text.split(",")]


def parse_int_list(text: str, option: str, minimum: int | None = None) -> tuple[int, ...]:
    """A comma list of whole numbers, sorted; a value named twice is refused, not silently merged."""
    try:
        given = [int(v) for v in text.split(",")]
    except ValueError:
        raise EdgeCompileError(f"{option} {text!r} is not a comma list of whole numbers (e.g. 4,8)") from None
    if len(set(given)) != len(given):
        raise EdgeCompileError(f"{option} {text!r} names a value twice: name each once")
    values = tuple(sorted(given))
    if minimum is not None and values[0] < minimum:
        raise EdgeCompileError(f"{option} {text!r}: every value must be >= {minimum}")
    return values

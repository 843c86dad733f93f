"""Reading an imported config's fields with the rigour of edgecompile's own checkpoint format: each field has
one JSON type and a range, and anything else (a string for a number, 2.5 heads, a boolean for a count, a null
where a value is needed) is a one-line error naming the file, the key and what is expected. Nothing is cast."""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgecompile.errors import EdgeCompileError

_MISSING = object()


def read_json_object(path: Path, what: str = "file") -> dict:
    """A JSON file that must hold one object (a config, an index, a manifest), or the one-line error saying why not."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeCompileError(f"{path}: the {what} cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EdgeCompileError(f"{path}: the {what} is not a JSON object")
    return data


class Fields:
    def __init__(self, data: dict, where: Path | str):
        self.data, self.where = data, where

    def bad(self, key: str, value, want: str) -> EdgeCompileError:
        return EdgeCompileError(f"{self.where}: {key} = {value!r} is not {want}: fix the config (or re-save it with save_pretrained)")

    def has(self, key: str) -> bool:
        return key in self.data

    def int(self, key: str, default=_MISSING, minimum: int | None = 1, maximum: int | None = 1_000_000) -> int:
        value = self.data.get(key, default)
        if value is _MISSING:
            raise EdgeCompileError(f"{self.where}: {key} is missing: it must be a whole number")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(key, value, "a whole number")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.bad(key, value, f"a whole number in {minimum}..{maximum}")
        return value

    def optional_int(self, key: str, minimum: int | None = 1, maximum: int | None = 1_000_000) -> int | None:
        return None if self.data.get(key) is None else self.int(key, minimum=minimum, maximum=maximum)

    def float(self, key: str, default=_MISSING, minimum: float | None = None, maximum: float | None = None,
              open_minimum: bool = False) -> float:
        value = self.data.get(key, default)
        if value is _MISSING:
            raise EdgeCompileError(f"{self.where}: {key} is missing: it must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.bad(key, value, "a finite number")
        low_ok = minimum is None or (value > minimum if open_minimum else value >= minimum)
        if not low_ok or (maximum is not None and value > maximum):
            lo = f"{'>' if open_minimum else '>='} {minimum:g}" if minimum is not None else ""
            hi = f"<= {maximum:g}" if maximum is not None else ""
            raise self.bad(key, value, f"a number {' and '.join(x for x in (lo, hi) if x)}")
        return float(value)

    def optional_float(self, key: str, **bounds) -> float | None:
        return None if self.data.get(key) is None else self.float(key, **bounds)

    def bool(self, key: str, default=_MISSING) -> bool | None:
        value = self.data.get(key, default)
        if value is _MISSING:
            raise EdgeCompileError(f"{self.where}: {key} is missing: it must be true or false")
        if value is not None and not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
        return value

    def str(self, key: str, default=_MISSING) -> str:
        value = self.data.get(key, default)
        if value is _MISSING or not isinstance(value, str):
            raise self.bad(key, None if value is _MISSING else value, "text")
        return value

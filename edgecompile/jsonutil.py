"""JSON that is always valid: NaN and infinities (a failed measurement) are written as null, never as bare NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return finite_or_none(obj.item())
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, default=str)

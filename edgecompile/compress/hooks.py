"""Forward hooks on a model's layers for the length of a `with` block: the statistics, the sweep and bias
correction each observe every palettizable layer's input and output during ordinary forward passes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

from torch import nn

Hook = Callable[[nn.Module, tuple, object], None]  # (module, inputs, output)


@contextmanager
def forward_hooks(layers: dict[str, nn.Module], hook_for: Callable[[str], Hook]):
    """Register `hook_for(name)` on each layer; removed on exit, however the block ends."""
    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

"""Where torch stages run: `--device auto|cpu|cuda|mps`.

auto picks CUDA, then Apple's MPS, then the CPU. Every stage computes in full fp32 on every device: TF32 is
switched off for CUDA matmuls and convolutions, since it rounds inputs to 10 mantissa bits and a package is
verified at >= 60 dB against a simulation computed this way. Tensors that outlive a stage (calibration sets,
teacher outputs) are kept on the CPU; models and the batch in flight move to the device. CUDA and MPS run the same
code: only `resolve_device` tells them apart.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompile.choices import Device
from edgecompile.errors import EdgeCompileError



def available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for --device NAME, set up for full fp32; an unavailable one is a one-line error."""
    name = Device.parse(name, "--device").value
    kind = next(k for k in ("cuda", "mps", "cpu") if available(k)) if name == "auto" else name
    if not available(kind):
        raise EdgeCompileError(f"--device {kind}: no {kind.upper()} device is available to torch on this machine "
                               "(use --device cpu, or auto to take the best one there is)")
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # full fp32: TF32 would round matmul inputs to 10 bits
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(kind)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def free_memory_bytes(device: torch.device, host_available: int | None) -> int | None:
    """What a new allocation on `device` can use now: CUDA's free memory, MPS's recommended working set, or the
    host's available memory (`host_available`) for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    return host_available


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `device` (CUDA keeps one; the host's resident peak only grows)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """The process's resident peak so far (host) and, on CUDA, the tensors' peak since reset_peak_memory."""
    import resource

    peaks = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # Linux reports KiB
    if device.type == "cuda":
        peaks["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return peaks


_LIBC = None  # glibc, loaded on first use (False where there is none)


def release_freed_host_memory() -> None:
    """Hand memory the process has freed back to the system (glibc's malloc_trim; nothing elsewhere).

    glibc keeps freed blocks under its dynamic mmap threshold (up to 32 MB) in its heaps: after the layer
    statistics' backward passes at the paper's width 0.5, 4.3 GiB of freed per-layer gradients stayed resident,
    and the sweep's palettes were then allocated on top of them. Called between the stages' batches."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)



"""Write-then-rename outputs: a failed or interrupted command leaves nothing half-written behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgecompile.errors import EdgeCompileError


def check_output_path(dest: Path, force: bool) -> None:
    """Fail before any work when `dest` exists (without --force) or its parent cannot be written."""
    if dest.exists() and not force:
        raise EdgeCompileError(f"output {dest} already exists: choose another path or pass --force to replace it")
    parent = dest.parent if str(dest.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise EdgeCompileError(f"output {dest} cannot be written ({probe} is not a writable folder): choose a writable path")


@contextlib.contextmanager
def atomic_path(dest: str | Path, force: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `dest`; rename it onto `dest` only when the block completes.

    Any exception, KeyboardInterrupt included, removes the temporary and leaves `dest` untouched.
    """
    dest = Path(dest)
    check_output_path(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    target = tmp if is_dir else tmp / dest.name
    try:
        yield target
        _apply_umask(target)
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()
        os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(path: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; give the result the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)

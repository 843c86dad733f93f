"""The one guarded way edgecompile writes outputs (export, init, calibrate, sweep, bench).

Promises, each checked by tests/test_robustness.py:
- an output is never an input, never inside one and never contains one (resolved paths, symlinks followed);
- a folder is only replaced (--force) when edgecompile wrote it (it holds one of OWNED_MARKERS), and never the
  folder the command runs in or one of its parents;
- one writer per output: an advisory lock beside it; a second writer fails at once and names the first's pid;
- work is staged in a hidden sibling `.NAME.PID.RAND.partial/` and renamed into place at the end. With --force
  the old output is renamed aside first, the new one renamed in, and only then the old one deleted, so no
  failure leaves neither; several outputs (the widths of one export) commit together or not at all;
- coremltools' and torch's temporary files go into the staging folder (`tempfile.tempdir` points there while
  a stage runs), so an interrupted run leaves nothing in $TMPDIR;
- SIGINT and SIGTERM are handled alike (both raise KeyboardInterrupt; see `termination_as_interrupt`), and are
  held back while an output is being committed or cleaned up;
- staging folders of killed runs (their pid gone) are removed by the next run writing the same output;
- folders created only to hold an output are removed again when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from edgecompile.errors import EdgeCompileError

log = logging.getLogger("edgecompile")

# A folder holding one of these was written by edgecompile (an export width, a checkpoint, a bench report).
STAGING_SUFFIX = ".partial"  # staging folders: .NAME.PID.RAND.partial
OWNED_MARKERS = ("report.json", "checkpoint.json", "bench.json")
TERMINATING_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, fallback: str = "model") -> str:
    """A file-name component derived from data (a model name): never a path, never hidden, at most 100 chars."""
    name = _SAFE_NAME.sub("_", str(text)).lstrip(".-_")[:100]
    return name or fallback


def _resolved(path: str | Path) -> Path:
    try:
        return Path(os.path.abspath(Path(path).expanduser())).resolve(strict=False)
    except RuntimeError:  # a symlink loop (pathlib raises RuntimeError for it before Python 3.13)
        raise EdgeCompileError(f"{path} is a symbolic link that points back to itself (a loop): pass the real file or folder") from None


def _overlap(dest: Path, source: Path) -> str | None:
    if dest == source:
        return "is"
    if dest in source.parents:
        return "contains"
    if source in dest.parents:
        return "lies inside"
    return None


def check_output_path(dest: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, an output that would lose data or cannot be written."""
    dest = Path(dest)
    real = _resolved(dest)
    for source in inputs:
        if source is None:
            continue
        how = _overlap(real, _resolved(source))
        if how:
            raise EdgeCompileError(f"output {dest} {how} the input {source}: write the output somewhere else")
    cwd = _resolved(Path.cwd())
    if real == cwd or real in cwd.parents:
        raise EdgeCompileError(f"output {dest} is the folder you are in (or one above it): give a new folder, e.g. -o out/{dest.name or 'result'}")
    if dest.is_symlink() or dest.exists():
        if not force:
            raise EdgeCompileError(f"output {dest} already exists: choose another path or pass --force to replace it")
        if dest.is_dir() and not dest.is_symlink() and not any((dest / m).is_file() for m in OWNED_MARKERS):
            raise EdgeCompileError(f"output {dest} is a folder edgecompile did not write (no {', '.join(OWNED_MARKERS)}): "
                                   "--force replaces edgecompile outputs only; choose another path")
    probe = dest.parent if str(dest.parent) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise EdgeCompileError(f"output {dest} cannot be written ({probe} is not a writable folder): choose a writable path")


# ---- signals ---------------------------------------------------------------------------------------------
def _raise_interrupt(signum, frame):
    # one interrupt is enough: a second one must not cut the cleanup the first one started
    for s in TERMINATING_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """SIGTERM (what `timeout`, CI and process managers send) and SIGHUP clean up exactly as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in TERMINATING_SIGNALS}
    for s in TERMINATING_SIGNALS:
        signal.signal(s, _raise_interrupt)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back until the block ends (a commit or cleanup must not stop half-way;
    coremltools' import swallows KeyboardInterrupt in its bare `except:`). A signal that arrived is acted on
    afterwards, by the handler that was in place. The handlers are swapped rather than the signals masked: a
    process-directed signal goes to any thread that does not block it (torch's workers), and Python would then
    raise in the main thread all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in TERMINATING_SIGNALS}
    for s in TERMINATING_SIGNALS:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            handler = old[pending[0]]
            if callable(handler):
                handler(pending[0], None)  # ours or Python's default_int_handler: raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


def quiet_staging_unraisable(hook_args) -> None:
    """sys.unraisablehook: coremltools' NamedTemporaryFiles live in our scratch folder (scratch_tempdir); after a
    failure removed that folder, their finalizers' unlink fails at exit. Those are expected and silent; any other
    unraisable exception goes to Python's default hook."""
    exc = hook_args.exc_value
    if isinstance(exc, FileNotFoundError) and f"{STAGING_SUFFIX}{os.sep}" in str(exc.filename or ""):
        return
    sys.__unraisablehook__(hook_args)


# ---- locks and stale staging folders --------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An advisory lock on one output path (`.NAME.lock` beside it, removed on release)."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.path = dest.parent / f".{dest.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise EdgeCompileError(f"output {self.dest} is being written by another edgecompile process (pid {holder}): "
                                       "wait for it to finish or choose another output") from None
            try:  # the file may have been unlinked by a releasing holder between our open and flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def remove_stale_staging(dest: Path) -> list[Path]:
    """Staging folders of `dest` left by killed runs (their pid no longer alive): removed, and returned."""
    removed = []
    if not dest.parent.is_dir():
        return removed
    for p in dest.parent.glob(f".{glob_escape(dest.name)}.*"):
        parts = p.name[len(dest.name) + 2:].split(".")
        if len(parts) == 3 and parts[2] in ("partial", "old") and parts[0].isdigit():
            pid = int(parts[0])
            if pid != os.getpid() and not _pid_alive(pid):
                _remove(p)
                removed.append(p)
    for p in removed:
        log.warning("removed %s, left by an interrupted run", p)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---- staging and commit ----------------------------------------------------------------------------------
def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last) so a failure can remove them again."""
    created = []
    for p in reversed([folder, *folder.parents]):
        if not p.exists():
            p.mkdir()
            created.append(p)
    return created


def _stage_name(dest: Path, kind: str) -> str:
    return f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.{kind}"


@contextlib.contextmanager
def scratch_tempdir(folder: Path) -> Iterator[Path]:
    """Point `tempfile` (coremltools' temporary packages, torch's) and child processes' TMPDIR at `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    old_dir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(folder)
    os.environ["TMPDIR"] = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


# How libraries that write files report a failed write in their own exception types: coremltools' MIL FileWriter
# (a RuntimeError that names no cause) and its package copy ("filesystem error: cannot copy"), safetensors
# (SafetensorError wrapping the OS error), PIL and others
# (messages naming errno 28). Each stands for an OSError.
_DISK_FULL_TEXT = ("no space left", "storagefull", "os error 28", "errno 28", "disk quota")
_WRITE_FAILED_TEXT = ("filewriter", "ioerror", "i/o error", "input/output error", "error while serializing", "failed to write",
                      "could not write", "filesystem error", "cannot copy")  # the last two: coremltools' C++ (std::filesystem)
MIN_FREE_BYTES = 1 << 20  # a write that failed with less than this free on the device is taken for a full disk


def as_os_error(error: BaseException, where: Path) -> OSError | None:
    """The OSError a library's write error stands for (ENOSPC for a full disk, EIO otherwise); None when it is
    not a write error."""
    if isinstance(error, OSError) or not isinstance(error, Exception):
        return None
    text = str(error).lower()
    if not any(t in text for t in _DISK_FULL_TEXT + _WRITE_FAILED_TEXT):
        return None
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    full = any(t in text for t in _DISK_FULL_TEXT) or (free is not None and free < MIN_FREE_BYTES)
    if full:
        return OSError(errno.ENOSPC, "No space left on device", str(where))
    return OSError(errno.EIO, f"writing failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})", str(where))


@contextlib.contextmanager
def library_write_errors(where: Path) -> Iterator[None]:
    """Turn a library's write error inside the block into the OSError it stands for (see as_os_error): the CLI
    prints an OSError as one line, and the staging folder around the block leaves nothing behind."""
    try:
        yield
    except Exception as e:
        mapped = as_os_error(e, where)
        if mapped is None:
            raise
        raise mapped from None


@contextlib.contextmanager
def atomic_outputs(dests: Sequence[str | Path], force: bool = False, is_dir: bool = True,
                   inputs: Iterable[str | Path | None] = ()) -> Iterator[list[Path]]:
    """Yield one staging path per destination; when the block completes, all of them replace their destinations
    together (or, on any failure, none does). Any exception, KeyboardInterrupt included, removes every staging
    folder and every folder created for them, and leaves existing outputs untouched."""
    dests = [Path(d) for d in dests]
    if len({_resolved(d) for d in dests}) != len(dests):
        raise EdgeCompileError(f"the same output is named twice ({', '.join(map(str, dests))})")
    inputs = list(inputs)
    for d in dests:
        check_output_path(d, force, inputs)
    created: list[Path] = []
    locks: list[OutputLock] = []
    stages: list[Path] = []
    committed = False
    try:
        for d in dests:
            created += _make_parents(d.parent)
            lock = OutputLock(d)
            lock.acquire()
            locks.append(lock)
            remove_stale_staging(d)
            check_output_path(d, force, inputs)  # again, under the lock: another writer may have finished meanwhile
            stages.append(Path(tempfile.mkdtemp(prefix=f".{d.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=d.parent)))
        targets = []
        for d, s in zip(dests, stages):
            target = s / "out" if is_dir else s / d.name
            if is_dir:
                target.mkdir()
            targets.append(target)
        with scratch_tempdir(stages[0] / "tmp"), library_write_errors(dests[0].parent):
            yield targets
        with interrupts_deferred():
            for t in targets:
                _apply_umask(t)
            _commit(list(zip(targets, dests)))
            committed = True
    finally:
        with interrupts_deferred():
            for s in stages:
                _remove(s)
            for lock in locks:
                lock.release()
            if not committed:
                for folder in reversed(created):
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only when empty: never someone else's files


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename every staged output onto its destination; old outputs go aside first and are deleted last."""
    asides: list[tuple[Path, Path]] = []
    done: list[Path] = []
    try:
        for _, dest in pairs:
            if dest.is_symlink() or dest.exists():
                aside = dest.parent / _stage_name(dest, "old")
                os.rename(dest, aside)
                asides.append((dest, aside))
        for target, dest in pairs:
            os.rename(target, dest)
            done.append(dest)
    except BaseException:
        for dest in done:
            _remove(dest)
        for dest, aside in asides:
            os.rename(aside, dest)
        raise
    for _, aside in asides:
        _remove(aside)
        if aside.exists():
            log.warning("the replaced output could not be fully deleted: remove %s yourself", aside)


@contextlib.contextmanager
def atomic_path(dest: str | Path, force: bool = False, is_dir: bool = True,
                inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """`atomic_outputs` for one destination: yields its staging path (a folder, or a file path when is_dir=False)."""
    with atomic_outputs([dest], force=force, is_dir=is_dir, inputs=inputs) as (target,):
        yield target


def _apply_umask(path: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; give the result the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)

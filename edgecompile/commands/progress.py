"""What a long command shows while it runs: a rich live display on a terminal, plain log lines elsewhere (CI
logs, `nohup`, a pipe), where a live display would only appear at exit. Both take the same two calls:

    on_stage(name)                  a stage starts (the previous one ends)
    update(description, done, total)  progress within the stage

`LogProgress` writes one line when a stage starts and one when it ends (with its duration), and within a stage
at most one line per `every` seconds, with the stage's ETA extrapolated from its own rate. Its clock is injected,
so what it prints is testable without waiting."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LogProgress:
    def __init__(self, stream: TextIO | None = None, every: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.every, self.clock = every, clock
        self.stage: str | None = None
        self.stage_start = self.last_line = 0.0
        self.start = clock()

    def _line(self, text: str) -> None:
        self.stream.write(f"edgecompile: [{format_seconds(self.clock() - self.start)}] {text}\n")
        self.stream.flush()

    def _end_stage(self) -> None:
        if self.stage is not None:
            self._line(f"{self.stage}: done in {format_seconds(self.clock() - self.stage_start)}")
            self.stage = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self._end_stage()
        return False

    def on_stage(self, name: str) -> None:
        self._end_stage()
        self.stage, self.stage_start = name, self.clock()
        self.last_line = self.stage_start
        self._line(f"{name}: started")

    def update(self, description: str, done: int, total: int) -> None:
        if self.stage is None:
            self.on_stage(description)
        now = self.clock()
        if now - self.last_line < self.every and done < total:
            return
        self.last_line = now
        elapsed = now - self.stage_start
        eta = f", eta {format_seconds(elapsed / done * (total - done))}" if 0 < done < total else ""
        self._line(f"{self.stage}: {description} {done}/{total}{eta}")


def log_progress(stream: TextIO | None = None, every: float = 30.0) -> dict:
    """`run_export(..., **log_progress())`: plain progress lines on stderr for Python callers."""
    display = LogProgress(stream, every)
    return {"on_stage": display.on_stage, "progress": display.update}


class RichProgress:
    """A rich progress display: one line per pipeline stage, with a bar for stages that report progress."""

    def __init__(self, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        # elapsed, then the estimate of what remains (rich extrapolates from the stage's own rate)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.stage = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._finish()
        return self.progress.__exit__(*exc)

    def _finish(self):
        if self.task is not None:
            t = self.progress.tasks[self.task]
            self.progress.update(self.task, total=t.total or 1, completed=t.total or 1)

    def on_stage(self, name: str) -> None:
        self._finish()
        self.stage = name
        self.task = self.progress.add_task(name, total=None)

    def update(self, description: str, done: int, total: int) -> None:
        if self.task is None:
            self.on_stage(description)
        self.progress.update(self.task, description=f"{self.stage}: {description}", completed=done, total=total)


def stage_display(console, stream: TextIO | None = None):
    """The display for this process's stderr: rich on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    return RichProgress(console) if stream.isatty() else LogProgress(stream)

"""The `edgecompile` command (`python -m edgecompile`). Signals are taken over first, before the CLI's imports
(torch, rich, ...: about two seconds), so that Ctrl-C or SIGTERM at any moment ends with one line and exit 130,
never a traceback. A signal during those imports is held until they finish: raised inside torch's import, a
KeyboardInterrupt can cross a C++ callback and abort the process (SIGABRT)."""

from __future__ import annotations

import os
import sys

from edgecompile.atomic import interrupts_deferred, termination_as_interrupt


def main() -> None:
    try:
        with termination_as_interrupt(), interrupts_deferred():
            from edgecompile.cli import main as run_cli  # deliberately late: see the module docstring
    except KeyboardInterrupt:
        print("edgecompile: interrupted; nothing was written", file=sys.stderr, flush=True)
        os._exit(130)  # nothing was started; see cli.main for why not sys.exit
    run_cli()


if __name__ == "__main__":
    main()

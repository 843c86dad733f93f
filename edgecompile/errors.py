"""The exceptions the CLI turns into one line on stderr: bad input (exit 2) and a failed verification (exit 1)."""


class EdgeCompileError(Exception):
    """A problem with what the user gave us (file, option, config), stated with how to fix it."""

    exit_code = 2


class VerificationFailed(EdgeCompileError):
    """An output executed below its fidelity bar (or produced non-finite values): nothing unverified ships."""

    exit_code = 1

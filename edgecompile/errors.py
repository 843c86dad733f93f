"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class EdgeCompileError(Exception):
    """A problem with what the user gave us (file, option, config), stated with how to fix it."""

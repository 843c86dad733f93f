"""edgecompile: compile elastic efficient-DiT checkpoints into verified Core ML packages."""

__version__ = "0.1.0"

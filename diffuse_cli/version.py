"""The version, at the ground floor: checkpoints record it, the CLI prints it."""

__version__ = "0.1.0"

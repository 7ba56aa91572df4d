"""The errors a user can cause; the CLI prints each as one line. (No torch here: `--help` stays fast.)"""


class DataError(ValueError):
    """No usable training data; the message names the folder and what was found."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class RunError(ValueError):
    """A run folder that cannot be started or resumed as asked; the message says what to pass instead."""

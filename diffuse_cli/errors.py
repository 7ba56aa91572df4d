"""The errors diffuse raises on purpose; the CLI prints each as one line. (No torch here: `--help` stays fast.)

Every one is a DiffuseError whose message says what is wrong and what to do instead; the CLI
exits with its `exit_code` (2 for input that cannot work) without reading the message.
"""

from __future__ import annotations

from typing import Callable


class Words:
    """A message for a person that may name settings: each written as `{name}`, the names listed after it.
    Words("{strength} must be in (0, 1]", "strength") reads "strength must be in (0, 1]" from the API, and
    the CLI words it with its flag instead ("--strength must be in (0, 1]")."""

    def __init__(self, message: str, *settings: str):
        self.template, self.settings = message, settings

    def __str__(self) -> str:
        return self.worded(str)

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The message with each setting it names written as name_of(setting)."""
        message = self.template
        for name in self.settings:  # by replacement, not str.format: a path in the message may hold braces
            message = message.replace("{" + name + "}", name_of(name))
        return message


class Note(str):
    """A message for the log that may name settings, as Words: it reads as the API words it wherever a str is
    wanted (str(Words)), and the CLI words it with its flags (`words`)."""

    def __new__(cls, message: str, *settings: str) -> "Note":
        words = Words(message, *settings)
        note = super().__new__(cls, str(words))
        note.words = words
        return note


def worded(message: str, name_of: Callable[[str], str]) -> str:
    """A message as a caller words its settings: a Note or Words with name_of, a plain str as it is."""
    words = message.words if isinstance(message, Note) else message if isinstance(message, Words) else None
    return message if words is None else words.worded(name_of)


class DiffuseError(Words, ValueError):
    """Something diffuse cannot do as asked; the message (Words) names the input and the fix."""

    exit_code = 2

    def __init__(self, message: str, *settings: str):
        Words.__init__(self, message, *settings)
        ValueError.__init__(self, self.worded(str))


class UsageError(DiffuseError):
    """An option or argument out of its range, or options that do not go together."""


class ConfigError(DiffuseError):
    """A configuration value that cannot work; the message says what is allowed."""


class DataError(DiffuseError):
    """No usable training data, or an image that cannot be read; the message names the file or folder."""


class CheckpointError(DiffuseError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class RunError(DiffuseError):
    """A run folder that cannot be started or resumed as asked; the message says what to pass instead."""


class DiskFull(DiffuseError):
    """A file that could not be written for lack of space (or quota, or a failing disk); what was there before is
    intact, and no partial file is left."""

    exit_code = 1


class TrainingFailed(DiffuseError):
    """Training went wrong on its own (it diverged, or the device ran out of memory), not from bad input."""

    exit_code = 1


def out_of_memory(error: BaseException) -> bool:
    """Whether an exception from torch is the device or the host running out of memory. torch raises
    torch.OutOfMemoryError on GPUs but a plain RuntimeError on the CPU, told apart only by its text."""
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error)

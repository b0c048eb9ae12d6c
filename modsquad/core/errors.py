"""Errors that users can cause.

Every exception here is printed by the CLI as one red line (no traceback) and exits with code 2. Library
code raises the most specific subclass and names the offending file, field or value in the message.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class for mistakes in user input (files, configs, arguments)."""


class ConfigError(UserError):
    """A config file or `--set` override is malformed, misspelt or has a value of the wrong type."""


class DataError(UserError):
    """A dataset file is missing, unreadable or has the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint or extracted model is missing, corrupt, or belongs to another architecture."""


class UnknownNameError(UserError, KeyError):
    """A model preset, task, router or other registered name does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TrainingError(UserError):
    """Training cannot go on (for example a NaN/inf loss); the last good checkpoint is kept."""


class OutputPathError(UserError):
    """An output path cannot be written: a file stands where a folder is needed, or the reverse, or an output
    would overwrite an input or another output."""

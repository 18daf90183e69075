"""User-facing errors.

A CharlmError is a mistake the user can fix (bad path, bad option, wrong checkpoint). The CLI prints
it as one line and exits 2; anything else is a bug and gets a traceback in a log file.
"""

from __future__ import annotations


class CharlmError(Exception):
    """A problem in the user's input, with the fix spelled out."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class CorpusError(CharlmError):
    """The text file cannot be used (missing, empty, binary, too short)."""


class VocabError(CharlmError):
    """Characters the model does not know."""


class CheckpointError(CharlmError):
    """A checkpoint that is missing, damaged, foreign or incompatible."""


class ConfigError(CharlmError):
    """An option value out of range or options that do not fit together."""


class TrainingError(CharlmError):
    """Training cannot go on (for example the loss stays non-finite)."""


class ArchiveError(CharlmError):
    """A .clm archive that is damaged, foreign, or needs another model; input that cannot be compressed."""

"""Typed errors raised by autockpt.

Every error autockpt raises on purpose derives from :class:`AutockptError`, so a caller can catch them all
at once. Each also derives from the closest built-in exception (``ValueError``, ``TypeError``, ...), so code
written against those keeps working.
"""

from __future__ import annotations


class AutockptError(Exception):
    """Base class of every error autockpt raises on purpose."""


class InvalidArgumentError(AutockptError, ValueError):
    """An argument has a value or type autockpt cannot work with."""


class UnsupportedValueError(AutockptError, TypeError):
    """A value in the state cannot be stored without pickle (the message names its key path)."""


class CheckpointNotFoundError(AutockptError, FileNotFoundError):
    """The requested checkpoint (or directory) does not exist."""


class CorruptCheckpointError(AutockptError):
    """A checkpoint failed verification: a file is missing, truncated, altered or malformed."""


class StateMismatchError(AutockptError, ValueError):
    """The checkpoint does not fit the object it is restored into.

    Raised before any value is copied, so the target is untouched. ``missing``, ``unexpected`` and
    ``mismatched`` list the key paths concerned.
    """

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


class SaveError(AutockptError, OSError):
    """Writing a checkpoint failed; earlier checkpoints are intact and the partial files were removed."""


class LeaseError(AutockptError):
    """Another live process holds the writer lease of this checkpoint directory."""

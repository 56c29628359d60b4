"""Typed errors raised by autockpt.

Every error autockpt raises on purpose derives from :class:`AutockptError`, so a caller can catch them all
at once. Each also derives from the closest built-in exception (``ValueError``, ``TypeError``, ...), so code
written against those keeps working.

Imports nothing of autockpt: every module may import it.

One job: the error classes.
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
    """Writing a checkpoint failed; earlier checkpoints are intact and the partial files were removed.

    ``failures``: in a multi-process save, each rank that failed and its error message (empty otherwise).
    """

    failures: dict[int, str] = {}  # a read-only default; set per instance


class LeaseError(AutockptError):
    """Another live process holds the writer lease of this checkpoint directory, or this process lost it."""


class StorageAccessError(AutockptError, OSError):
    """The checkpoint directory cannot be written at all: read-only, a file where the directory should be, or
    no credentials. Permanent: raised when the writer starts (``acquire``), never retried or warned past."""


class RankFailureError(AutockptError):
    """An autockpt error raised on other ranks of a multi-process run (like torch DCP's CheckpointException).

    ``failures`` maps each rank that failed to its error. The error is also an instance of the first failed
    rank's error class (a ``CorruptCheckpointError`` on rank 1 arrives as one on every rank), so code that
    catches that class keeps working. Build one with :func:`failed_on_ranks`.
    """

    def __init__(self, message: str, failures: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException] = dict(failures or {})


_ON_RANKS: dict[type, type] = {}


def failed_on_ranks(failures: dict[int, BaseException]) -> RankFailureError:
    """The error to raise on a rank that did not fail itself: the first failure's class, holding every failure.

    ```python
    from autockpt.errors import CorruptCheckpointError, RankFailureError, failed_on_ranks
    e = failed_on_ranks({1: CorruptCheckpointError("bad checksum")})
    assert isinstance(e, CorruptCheckpointError) and isinstance(e, RankFailureError)
    assert str(e) == "on rank 1: bad checksum" and list(e.failures) == [1]
    ```
    """
    rank, first = min(failures.items())
    base = type(first) if isinstance(first, AutockptError) else SaveError
    cls = _ON_RANKS.get(base)
    if cls is None:
        cls = _ON_RANKS[base] = type(f"{base.__name__}OnOtherRanks", (RankFailureError, base), {})
    err = cls(f"on rank {rank}: {first}", failures)
    for key, value in vars(first).items():  # e.g. StateMismatchError's missing/unexpected/mismatched
        setattr(err, key, value)
    err.failures = dict(failures)
    return err

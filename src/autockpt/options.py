"""The options of a ``CheckpointManager``, checked in one place, with one error text for every entry point.

One job: validate options early (in ``__init__``) and raise :class:`~autockpt.errors.InvalidArgumentError` naming
the option, what it got and what it takes. The manager, ``autockpt.resume`` and the CLI use it; the callbacks
can call the same checkers (``check_positive``, ``check_bool``). In the spirit of Orbax's
``CheckpointManagerOptions``. Imports ``autockpt.errors`` and ``autockpt.retention``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from autockpt.errors import InvalidArgumentError
from autockpt.retention import KeepBest, RetentionPolicy


def check_positive(name: str, value: Any, kind: type) -> None:
    """``value`` is None or a positive ``kind`` (int, or float which also takes ints), finite; else raise."""
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or value <= 0 or (kind is float and not math.isfinite(value)):
        raise InvalidArgumentError(f"{name} must be a positive {kind.__name__} or None, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` is True or False; else raise."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")


def check_directory(directory: Any) -> None:
    """``directory`` is a non-empty path or URL string; else raise."""
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise InvalidArgumentError(f"directory must be a non-empty path or URL string, got {directory!r}")


@dataclass(frozen=True)
class ManagerOptions:
    """Every option of :class:`~autockpt.CheckpointManager` but the directory, validated when created.

    ```python
    from autockpt.errors import InvalidArgumentError
    from autockpt.options import ManagerOptions
    assert ManagerOptions(max_to_keep=2).policy.max_to_keep == 2
    try:
        ManagerOptions(save_interval_steps=0)
    except InvalidArgumentError as e:
        assert "save_interval_steps must be a positive int" in str(e)
    ```
    """

    max_to_keep: int | None = 5
    keep_every_n_hours: float | None = None
    keep_best: KeepBest | None = None
    save_interval_steps: int | None = None
    save_interval_seconds: float | None = None
    async_save: bool = False
    storage_options: dict[str, Any] | None = None
    max_consecutive_failures: int = 3
    progress: bool = False
    distributed: bool | None = None
    dedup: bool = True
    policy: RetentionPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", RetentionPolicy(self.max_to_keep, self.keep_every_n_hours, self.keep_best))
        check_positive("save_interval_steps", self.save_interval_steps, int)
        check_positive("save_interval_seconds", self.save_interval_seconds, float)
        check_bool("async_save", self.async_save)
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise InvalidArgumentError(f"storage_options must be a dict or None, got {self.storage_options!r}")
        check_positive("max_consecutive_failures", self.max_consecutive_failures, int)
        check_bool("progress", self.progress)
        check_bool("dedup", self.dedup)
        if self.distributed not in (None, True, False):
            raise InvalidArgumentError(
                f"distributed must be None (detect), True or False, got {self.distributed!r}"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in the order of ``CheckpointManager``'s signature."""
        return tuple(f.name for f in fields(cls) if f.init)

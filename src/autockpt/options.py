"""The options of a ``CheckpointManager``, checked in one place, with one error text for every entry point.

One job: validate options early (in ``__init__``) and raise :class:`~autockpt.errors.InvalidArgumentError` naming
the option, what it got and what it takes. The manager, ``autockpt.resume``, the Keras, Lightning and
Transformers callbacks and the CLI use it: an option they share with the manager is checked by the same code,
so the same bad value gives the same message from each (an interval named differently, such as
``every_n_seconds``, goes through the same ``check_positive`` under its own name). In the spirit of Orbax's
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
        what = "number" if kind is float else kind.__name__
        raise InvalidArgumentError(f"{name} must be a positive {what} or None, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` is True or False; else raise."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")


def check_storage_options(value: Any) -> None:
    """``value`` is a mapping of fsspec options or None; else raise."""
    if value is not None and not isinstance(value, Mapping):
        raise InvalidArgumentError(f"storage_options must be a dict or None, got {value!r}")


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
    local_dir: str | os.PathLike[str] | None = None
    local_max_to_keep: int = 2
    upload_deadline_s: float = 20.0
    rank_timeout: float = 300.0
    lease_ttl: float = 30.0
    lease_renew_seconds: float | None = None
    dedup: bool = True
    policy: RetentionPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", RetentionPolicy(self.max_to_keep, self.keep_every_n_hours, self.keep_best))
        check_positive("save_interval_steps", self.save_interval_steps, int)
        check_positive("save_interval_seconds", self.save_interval_seconds, float)
        check_bool("async_save", self.async_save)
        check_storage_options(self.storage_options)
        check_positive("max_consecutive_failures", self.max_consecutive_failures, int)
        check_bool("progress", self.progress)
        if self.rank_timeout is None:
            raise InvalidArgumentError("rank_timeout must be a positive number of seconds, got None")
        check_positive("rank_timeout", self.rank_timeout, float)
        check_positive("lease_ttl", self.lease_ttl, float)
        if self.lease_ttl is None:
            raise InvalidArgumentError("lease_ttl must be a positive float, got None")
        check_positive("lease_renew_seconds", self.lease_renew_seconds, float)
        if self.lease_renew_seconds is not None and self.lease_renew_seconds * 3 > self.lease_ttl * 2:
            raise InvalidArgumentError(
                f"lease_renew_seconds must be at most 2/3 of lease_ttl ({self.lease_ttl * 2 / 3:g} s), so that a "
                f"renewal lands before the lease runs low; got {self.lease_renew_seconds!r}. Leave it None for "
                "lease_ttl / 3"
            )
        check_bool("dedup", self.dedup)
        if self.distributed not in (None, True, False):
            raise InvalidArgumentError(
                f"distributed must be None (detect), True or False, got {self.distributed!r}"
            )

        if self.local_dir is not None:
            check_directory(self.local_dir)
        check_positive("local_max_to_keep", self.local_max_to_keep, int)
        if self.local_max_to_keep is None:
            raise InvalidArgumentError("local_max_to_keep must be a positive int, got None")
        check_positive("upload_deadline_s", self.upload_deadline_s, float)
        if self.upload_deadline_s is None:
            raise InvalidArgumentError("upload_deadline_s must be a positive number of seconds, got None")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in the order of ``CheckpointManager``'s signature."""
        return tuple(f.name for f in fields(cls) if f.init)

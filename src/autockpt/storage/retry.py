"""Retrying transient errors of remote storage with bounded backoff. Imports only ``autockpt.errors``."""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from autockpt.errors import CorruptCheckpointError

log = logging.getLogger("autockpt")
T = TypeVar("T")
RETRIES = 5
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def transient(e: BaseException) -> bool:
    """Whether an error of a remote filesystem is worth retrying (timeouts, dropped connections, 5xx)."""
    if isinstance(e, _PERMANENT) or isinstance(e, CorruptCheckpointError):
        return False
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EINVAL):
        return False
    mod = type(e).__module__
    return isinstance(e, (OSError, TimeoutError, ConnectionError)) or mod.startswith(
        ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google")
    )


def retry(fn: Callable[[], T], what: str, attempts: int = RETRIES) -> T:
    """Call ``fn``; on a transient error retry with exponential backoff and jitter (about 6 s at most)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1 or not transient(e):
                raise
            delay = min(2.0, 0.1 * 2**i) * (0.5 + random.random())
            log.warning("autockpt: %s failed (%r); retry %d of %d in %.2f s", what, e, i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")

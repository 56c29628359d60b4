"""Retrying transient errors of remote storage with bounded backoff. Imports only ``autockpt.errors``.

One job: bounded retries of transient storage errors.
"""

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


_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "DefaultCredentialsError", "ClientAuthenticationError")


def access_problem(e: BaseException) -> str | None:
    """What is permanently wrong with a directory, if ``e`` says it cannot be written at all, in words; else None.

    Read-only or forbidden, a file where a directory should be, missing credentials: never retried.

    ```python
    import errno
    from autockpt.storage.retry import access_problem
    assert "read-only" in access_problem(OSError(errno.EROFS, "Read-only file system"))
    assert access_problem(TimeoutError()) is None
    ```
    """
    if type(e).__name__ in _CREDENTIALS:
        return (f"no credentials to reach it ({e}): set them in the environment (e.g. AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY), a profile, or storage_options (e.g. key=..., secret=...)")
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return f"a file is where a directory should be ({e}): give a directory path"
    if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES)):
        return f"it is read-only or not writable by this user ({e}): give a writable directory"
    return None


def transient(e: BaseException) -> bool:
    """Whether an error of a remote filesystem is worth retrying (timeouts, dropped connections, 5xx)."""
    if isinstance(e, _PERMANENT) or isinstance(e, CorruptCheckpointError) or access_problem(e) is not None:
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

"""One writer per checkpoint directory: a lease file with a heartbeat.

The writing manager holds ``.autockpt-lease.json`` (owner host, pid, process start time, expiry) and renews
it from a background thread every ``ttl / 3`` seconds. A second process that wants to write while the lease
is live gets :class:`~autockpt.errors.LeaseError` instead of interleaving its checkpoints with the first
one's. A lease is dead, and may be taken over, once it expired (its writer stopped renewing: killed, or its
machine gone) or, at once, when its writer was a process on this same host that no longer exists (so a job
restarted after ``kill -9`` on the same machine does not wait). Readers never take the lease.

Imports ``autockpt.errors`` and ``autockpt.storage``. The lease is a small file of the storage: on local disks
it is replaced atomically (write a temporary file, rename). On object stores, which
have no compare-and-swap through fsspec, it is best effort: two writers starting within the same second may
both believe they hold it; the second one notices at its next renewal and stops writing with an error.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from autockpt.errors import LeaseError
from autockpt.storage import Storage

log = logging.getLogger("autockpt")
LEASE_NAME = ".autockpt-lease.json"


def _process_start(pid: int) -> str | None:
    """The start time of a process on this host (Linux), to tell a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive_here(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


class WriterLease:
    """The lease of one directory for this process; see the module docstring."""

    def __init__(self, storage: Storage, ttl: float = 30.0) -> None:
        self.storage = storage
        self.ttl = ttl
        self.path = storage.path(LEASE_NAME)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseError | None = None

    def read(self) -> dict[str, Any] | None:
        try:
            raw = self.storage.read_small(LEASE_NAME, 65536)
            lease = json.loads(raw)
            return lease if isinstance(lease, dict) else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def _mine(self, lease: dict[str, Any]) -> bool:
        return lease.get("host") == self.me["host"] and lease.get("pid") == self.me["pid"]

    def live_other(self, lease: dict[str, Any] | None) -> bool:
        """Whether ``lease`` belongs to another writer that may still be alive."""
        if lease is None or self._mine(lease):
            return False
        expires = lease.get("expires")
        if not isinstance(expires, (int, float)) or time.time() > expires:
            return False
        if lease.get("host") == self.me["host"] and isinstance(lease.get("pid"), int):
            return _alive_here(lease["pid"], lease.get("start"))
        return True

    def _write(self) -> None:
        body = json.dumps({**self.me, "expires": time.time() + self.ttl, "ttl": self.ttl}).encode()
        self.storage.write_small(LEASE_NAME, body)

    def describe(self, lease: dict[str, Any]) -> str:
        left = max(0.0, float(lease.get("expires", 0)) - time.time())
        return f"host {lease.get('host')!r}, pid {lease.get('pid')} (lease expires in {left:.0f} s unless renewed)"

    def acquire(self) -> None:
        """Take the lease or raise LeaseError; starts the heartbeat."""
        if self.held:
            return
        lease = self.read()
        if self.live_other(lease):
            assert lease is not None
            raise LeaseError(
                f"another process is writing checkpoints to {self.storage.url}: {self.describe(lease)}. "
                "Stop it, or write to another directory; reading (autockpt.load, restore) is always allowed."
            )
        self._write()
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="autockpt-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if another writer took the lease since we last renewed it."""
        if self.lost is not None:
            raise self.lost

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                lease = self.read()
                if self.live_other(lease):
                    assert lease is not None
                    self.lost = LeaseError(
                        f"the writer lease of {self.storage.url} was taken by {self.describe(lease)}; "
                        "this process stopped saving there"
                    )
                    log.error("autockpt: %s", self.lost)
                    self.held = False
                    return
                self._write()
            except Exception as e:  # a missed heartbeat is retried; the lease lives for ttl seconds
                log.warning("autockpt: could not renew the writer lease of %s: %r", self.storage.url, e)

    def _delete(self) -> None:
        try:
            self.storage.remove_small(LEASE_NAME)
        except FileNotFoundError:
            pass

    def remove_stale(self) -> None:
        """Remove the lease of a writer that is gone (a leftover of a crash); a live or own lease stays."""
        lease = self.read()
        if lease is not None and not self._mine(lease) and not self.live_other(lease):
            self._delete()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.held:
            return
        self.held = False
        lease = self.read()
        if lease is not None and self._mine(lease):
            self._delete()

"""One writer per checkpoint directory: a lease with generations, taken by an atomic create, and a fence.

The lease is a chain of small files ``.autockpt-lease-<generation>.json`` (owner host, pid, process start
time, a random token, expiry). The newest generation is the lease. Taking it, whether first or over a dead
writer, means creating the *next* generation's file with the storage's exclusive create (``link()`` on local
disks, ``If-None-Match: *`` on S3): of any number of writers starting at the same moment exactly one
creates it; the others get :class:`~autockpt.errors.LeaseError` before writing anything. The holder renews
its own generation's expiry every ``renew_seconds`` from a background thread. A lease is dead, and the next
generation may be taken, once it expired (its writer stopped renewing: killed, paused, or its machine gone),
at once when its writer was a process on this same host that no longer exists, or when it was released.
Generation files are never deleted but by the holder of a newer one, so generations only grow.

Fencing. The lease is the storage's fence: before each change (creating a checkpoint directory, opening and
closing a file, committing, deleting) the storage asks :meth:`WriterLease.guard`, which is free while the
lease is fresh (more than ``ttl / 3`` left by this process's monotonic clock since its last successful
renewal) and otherwise renews it against the storage; a commit asks :meth:`WriterLease.check`, which always
does. A holder whose lease ran out (paused past it) renews by taking the next generation like a newcomer:
if another writer took over meanwhile, that fails and this process raises ``LeaseError`` and changes
nothing more. What remains: a change that was already checked and is then delayed (the process paused
between the check and the storage request) by more than ``ttl / 3``, or clocks of two hosts that differ by
more than ``ttl / 3`` (expiry is wall-clock time written by the holder and read by the others).

Where the storage has no exclusive create (an fsspec filesystem other than local, memory:// and S3, or an
S3-compatible server that ignores ``If-None-Match``) the create is a check then a write: one warning says so
when the lease is taken. Readers never take the lease. Imports ``autockpt.errors`` and ``autockpt.storage``.

One job: the writer lease and its fence.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from typing import Any

from autockpt.errors import LeaseError
from autockpt.storage import Storage

log = logging.getLogger("autockpt")
LEASE_PREFIX = ".autockpt-lease-"
LEASE_RE = re.compile(r"^\.autockpt-lease-(\d{10,})\.json$")
LEASE_NAME = ".autockpt-lease.json"  # the single lease file of autockpt before generations: honoured, not written
_warned: set[str] = set()


def lease_name(generation: int) -> str:
    """The file of one generation of the lease: ``.autockpt-lease-0000000003.json``."""
    return f"{LEASE_PREFIX}{generation:010d}.json"


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


def current_lease(storage: Storage) -> tuple[int, dict[str, Any] | None] | None:
    """The newest generation of the lease of ``storage`` and its content (None if unreadable); None if none."""
    gens = [int(m.group(1)) for n in storage.small_files(LEASE_PREFIX) if (m := LEASE_RE.match(n))]
    if not gens:
        return None
    gen = max(gens)
    return gen, _read(storage, lease_name(gen))


def _read(storage: Storage, name: str) -> dict[str, Any] | None:
    try:
        lease = json.loads(storage.read_small(name, 65536))
        return lease if isinstance(lease, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def describe(lease: dict[str, Any]) -> str:
    """Who holds ``lease`` and until when, in words."""
    if lease.get("released"):
        return f"released by host {lease.get('host')!r}, pid {lease.get('pid')}"
    expires = float(lease.get("expires", 0))
    left = expires - time.time()
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
    state = f"expires in {left:.0f} s unless renewed" if left > 0 else f"expired {-left:.0f} s ago"
    return f"host {lease.get('host')!r}, pid {lease.get('pid')} (until {until}: {state})"


class WriterLease:
    """The lease of one directory for this process; see the module docstring.

    ```python
    from autockpt.lease import WriterLease, current_lease
    from autockpt.storage import open_storage
    storage = open_storage("memory://lease_demo")
    lease = WriterLease(storage, ttl=30)
    lease.acquire()
    assert current_lease(storage)[0] == lease.generation == 1
    lease.release()
    ```
    """

    def __init__(self, storage: Storage, ttl: float = 30.0, renew_seconds: float | None = None) -> None:
        self.storage = storage
        self.ttl = float(ttl)
        self.renew_seconds = float(renew_seconds) if renew_seconds is not None else self.ttl / 3
        self.margin = self.ttl / 3
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                   "token": secrets.token_hex(8)}
        self.generation: int | None = None
        self.lost: LeaseError | None = None
        self._valid_until = 0.0  # monotonic: no other writer can take over before this
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.generation is not None and self.lost is None

    def _mine(self, lease: dict[str, Any]) -> bool:
        return lease.get("token") == self.me["token"]

    def _this_process(self, lease: dict[str, Any]) -> bool:
        return bool(lease.get("host") == self.me["host"] and lease.get("pid") == self.me["pid"])

    def held_in_this_process(self, lease: dict[str, Any] | None) -> bool:
        """Whether ``lease`` is held (not released, not expired) by a manager of this process."""
        return lease is not None and self._this_process(lease) and not lease.get("released") \
            and time.time() < lease.get("expires", 0)

    def live_other(self, lease: dict[str, Any] | None) -> bool:
        """Whether ``lease`` belongs to another writer that may still be alive."""
        if lease is None or self._mine(lease) or lease.get("released"):
            return False
        if self._this_process(lease):
            return False  # another manager of this process (a notebook cell run again): taken over at once
        expires = lease.get("expires")
        if not isinstance(expires, (int, float)) or time.time() > expires:
            return False
        if lease.get("host") == self.me["host"] and isinstance(lease.get("pid"), int):
            return _alive_here(lease["pid"], lease.get("start"))
        return True

    def read(self) -> dict[str, Any] | None:
        """The newest lease (of any generation, or the single file of an older autockpt), None if none."""
        cur = current_lease(self.storage)
        return cur[1] if cur is not None else _read(self.storage, LEASE_NAME)

    def _body(self, generation: int, expires: float, **extra: Any) -> bytes:
        return json.dumps({**self.me, "generation": generation, "expires": expires, "ttl": self.ttl,
                           **extra}).encode()

    def _busy(self, lease: dict[str, Any]) -> LeaseError:
        return LeaseError(
            f"another process is writing checkpoints to {self.storage.url}: {describe(lease)}. "
            "Stop it, or write to another directory; reading (autockpt.load, restore) is always allowed."
        )

    def _take(self, after: int) -> bool:
        """Create generation ``after + 1``; True if this process won it."""
        t0 = time.monotonic()
        gen = after + 1
        if not self.storage.create_small(lease_name(gen), self._body(gen, time.time() + self.ttl)):
            won = _read(self.storage, lease_name(gen))  # a retried request whose first attempt had created it?
            if won is None or not self._mine(won):
                return False
        self.generation, self._valid_until = gen, t0 + self.ttl
        for name in self.storage.small_files(LEASE_PREFIX):  # older generations: dead, and ours to remove
            m = LEASE_RE.match(name)
            if m and int(m.group(1)) < gen:
                try:
                    self.storage.remove_small(name)
                except FileNotFoundError:
                    pass
        return True

    def acquire(self) -> None:
        """Take the lease or raise LeaseError; starts the heartbeat. Storage errors (OSError) propagate."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self.generation is not None:
                self.check()
                return
            if not self.storage.exclusive_create and self.storage.url not in _warned:
                _warned.add(self.storage.url)
                log.warning("autockpt: %s has no atomic create: two writers starting at the same moment may both "
                            "take the writer lease there (one of them stops at its next renewal)", self.storage.url)
            legacy = _read(self.storage, LEASE_NAME)
            if self.live_other(legacy):
                assert legacy is not None
                raise self._busy(legacy)
            cur = current_lease(self.storage)
            if cur is not None and self.live_other(cur[1]):
                assert cur[1] is not None
                raise self._busy(cur[1])
            if not self._take(cur[0] if cur is not None else 0):
                winner = self.read()
                raise self._busy(winner) if winner is not None else LeaseError(
                    f"another process took the writer lease of {self.storage.url} at the same moment")
            self.storage.fence = self
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name="autockpt-lease", daemon=True)
            self._thread.start()

    def _lose(self, why: str) -> LeaseError:
        self.lost = LeaseError(f"the writer lease of {self.storage.url} was lost: {why}; this process stopped "
                               "writing there (it committed and deleted nothing after losing it)")
        log.error("autockpt: %s", self.lost)
        return self.lost

    def check(self) -> None:
        """Renew against the storage; raise LeaseError unless this process still holds its generation."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self.generation is None:
                raise LeaseError(f"this process does not hold the writer lease of {self.storage.url}")
            t0 = time.monotonic()
            cur = current_lease(self.storage)
            if cur is not None and (cur[0] != self.generation or cur[1] is None or not self._mine(cur[1])):
                raise self._lose(f"it is now held by {describe(cur[1]) if cur[1] else 'another writer'}")
            # no lease file at all (the storage lost it: an object store restored empty): nobody holds one, so
            # this writer takes the next generation exactly as when its own ran out
            if cur is None or t0 >= self._valid_until - self.margin:  # (nearly) ran out, paused?: take the next
                if not self._take(self.generation):
                    winner = self.read()
                    raise self._lose(f"it expired and was taken by {describe(winner) if winner else 'another writer'}")
                return
            self.storage.write_small(lease_name(self.generation), self._body(self.generation, time.time() + self.ttl))
            self._valid_until = t0 + self.ttl

    def guard(self) -> None:
        """Raise LeaseError if the lease was lost; renew it against the storage when less than ttl/3 is left."""
        if self.lost is not None:
            raise self.lost
        if time.monotonic() > self._valid_until - self.margin:
            self.check()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                self.check()
            except LeaseError:
                return
            except Exception as e:  # a missed heartbeat is retried; the lease lives for ttl seconds
                log.warning("autockpt: could not renew the writer lease of %s: %r", self.storage.url, e)

    def remove_stale(self) -> None:
        """Remove the single lease file of an older autockpt whose writer is gone (a leftover of a crash)."""
        legacy = _read(self.storage, LEASE_NAME)
        if legacy is not None and not self.live_other(legacy):
            try:
                self.storage.remove_small(LEASE_NAME)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released if it is still ours (the next writer need not wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            gen, self.generation = self.generation, None
            if self.storage.fence is self:
                self.storage.fence = None
            if gen is None or self.lost is not None:
                return
            cur = current_lease(self.storage)
            if cur is not None and cur[0] == gen and cur[1] is not None and self._mine(cur[1]):
                self.storage.write_small(lease_name(gen), self._body(gen, 0.0, released=True))

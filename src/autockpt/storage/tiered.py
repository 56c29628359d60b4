"""``TieredStorage``: a fast local tier in front of a durable remote one, with a background uploader.

One job: compose a :class:`LocalStorage` (``local_dir``, where every checkpoint is written and committed at
local speed) and the remote storage of the run's directory (the durable tier, the source of truth). A thread
copies each locally committed checkpoint to the remote with the remote's own commit protocol (payload files,
checked for their sizes and for the checksum of the bytes sent, then the manifest last); only then is the step
*durable*. Newest first when behind; a failure is a warning and a retry later (bounded backoff); training never
waits for it.

Tier rules:
- the remote keeps what the manager's retention policy keeps: ``delete(step)`` (the manager's pruning) removes
  the local copy at once and the remote one from the uploader thread, so no save waits on the remote;
- the local tier keeps the ``local_max_to_keep`` newest plus every step not yet durable (those the policy
  still keeps, since the policy's deletions reach both tiers); so during a remote outage local copies pile up
  only to what the policy keeps, with one warning;
- a step held by both tiers is read from the local copy; :meth:`copies` lets the reader fall back to the
  remote copy when the local one does not verify;
- ``local_dir`` is bound to one remote: a marker file records its URL, and a local dir that holds checkpoints
  of another remote is refused.

Imports ``autockpt.errors`` and the package's own modules.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, TypeVar

import xxhash

from autockpt.errors import CheckpointNotFoundError, InvalidArgumentError, LeaseError, SaveError
from autockpt.storage.base import Fence, Listing, PayloadFile, Storage
from autockpt.storage.local import LocalStorage
from autockpt.storage.names import MANIFEST_NAME, MAX_MANIFEST_BYTES, step_dirname

log = logging.getLogger("autockpt")
T = TypeVar("T")
MARKER_NAME = ".autockpt-remote.json"
_CHUNK = 8 * 2**20
_PARALLEL = 4  # payload files uploaded at once (s3fs uploads each in multipart chunks)
_GIVE_UP_AFTER = 3  # failed attempts of one step before wait_until_finished() reports the failure
_MAX_BACKOFF = 30.0


class TieredStorage(Storage):
    """Checkpoints written to ``local`` and uploaded in the background to ``remote``.

    ```python
    import tempfile
    from autockpt.storage import open_storage
    from autockpt.storage.tiered import TieredStorage
    tiers = TieredStorage(open_storage(tempfile.mkdtemp()), open_storage("memory://tiered_demo"))
    assert tiers.durable_step is None and tiers.wait_uploads(timeout=1.0)
    tiers.close()
    ```
    """

    atomic_rename = True  # the commit is the local tier's rename
    holds_shared_packs = False  # the uploader copies checkpoint directories; dedup through tiers is not built yet

    def __init__(self, local: Storage, remote: Storage, local_max_to_keep: int = 2) -> None:
        if not isinstance(local, LocalStorage):
            raise InvalidArgumentError(f"local_dir must be a path on a local filesystem, got {local.url!r}")
        self.local, self.remote = local, remote
        self.url, self.root, self.fs = remote.url, remote.root, remote.fs
        self.local_max_to_keep = local_max_to_keep
        self._check_binding()
        self._lock = threading.Condition()
        self._durable: set[int] = self._remote_steps()  # then kept up to date: one writer (the lease)
        self._pending: set[int] = set()  # committed locally, to upload
        self._uploading: int | None = None
        self._remote_deletes: set[int] = set()
        self._attempts: dict[int, int] = {}
        self._error: BaseException | None = None
        self._warned_backlog = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0

    def _remote_steps(self) -> set[int]:
        try:
            return set(self.remote.scan().committed)
        except Exception as e:  # unreachable: the local tier still works; uploads retry later
            log.warning("autockpt: cannot list %s (%r); only the local copies in %s are known", self.remote.url, e,
                        self.local.url)
            return set()

    # ------------------------------------------------------------------------------------------ binding
    def _check_binding(self) -> None:
        try:
            bound = json.loads(self.local.read_small(MARKER_NAME)).get("remote")
        except (OSError, ValueError, AttributeError):
            return
        if bound != self.remote.url and self.local.scan().committed:
            raise InvalidArgumentError(
                f"local_dir {self.local.url} holds checkpoints of {bound!r}, not of {self.remote.url!r}: give "
                "this run its own local_dir, or upload those (autockpt sync) and empty it"
            )

    def _bind(self) -> None:
        try:
            bound = json.loads(self.local.read_small(MARKER_NAME)).get("remote")
        except (OSError, ValueError, AttributeError):
            bound = None
        if bound != self.remote.url:
            self.local.write_small(MARKER_NAME, json.dumps({"remote": self.remote.url}).encode())

    # ------------------------------------------------------------------------------------------ tiers
    @property
    def durable_step(self) -> int | None:
        """The newest step committed on the remote tier (as this process knows it), or None."""
        with self._lock:
            return max(self._durable, default=None)

    def where(self, uploading: bool = False) -> dict[int, str]:
        """For each step: ``local``, ``remote``, ``both`` or ``uploading`` (local only, and this process or,
        with ``uploading``, the run's live writer uploads it)."""
        local = set(self.local.scan().committed)
        with self._lock:
            durable = set(self._durable)
        out = {s: "both" if s in durable else "uploading" for s in local}
        out.update({s: "remote" for s in durable - local})
        if not self._thread and not uploading:  # a reader: a local-only step is not being uploaded
            out.update({s: "local" for s in local - durable})
        return dict(sorted(out.items()))

    def copies(self, step: int) -> list[Storage]:
        local = self.local.exists(os.path.join(step_dirname(step), MANIFEST_NAME))
        with self._lock:
            durable = step in self._durable
        return [s for s, has in ((self.local, local), (self.remote, durable)) if has] or [self.local]

    def _read(self, step: int, fn: Callable[[Storage], T]) -> T:
        """``fn`` on the first tier holding ``step``; the next one if the local copy went meanwhile (pruned)."""
        copies = self.copies(step)
        for copy in copies[:-1]:
            try:
                return fn(copy)
            except (CheckpointNotFoundError, FileNotFoundError):
                continue
        return fn(copies[-1])

    # ------------------------------------------------------------------------------------------ Storage
    def path(self, *parts: str) -> str:
        return self.remote.path(*parts)

    def join(self, directory: str, name: str) -> str:
        return self.local.join(directory, name)

    def scan(self) -> Listing:
        listing = self.local.scan()
        with self._lock:
            for s in self._durable - self._remote_deletes:  # a step being deleted is gone already
                listing.committed.setdefault(s, step_dirname(s))
        return listing

    def root_exists(self) -> bool:
        return self.local.root_exists() or self.remote.root_exists()

    def root_is_file(self) -> bool:
        return self.local.root_is_file() or self.remote.root_is_file()

    # The lease and its small files live on the remote (the source of truth), and its fence guards the remote:
    # a writer that lost the lease uploads, commits and deletes nothing there. The local tier is this node's
    # own and is not fenced, so that saves go on while the remote (and with it the lease) is unreachable; what
    # a writer that lost the lease commits locally never reaches the remote.
    @property
    def fence(self) -> Fence | None:
        return self.remote.fence

    @fence.setter
    def fence(self, fence: Fence | None) -> None:
        self.remote.fence = fence

    def check_fence(self) -> None:
        return None  # local commits are not fenced (above); the upload checks the remote fence before its commit

    @property
    def exclusive_create(self) -> bool:
        return self.remote.exclusive_create

    def create_small(self, name: str, data: bytes) -> bool:
        return self.remote.create_small(name, data)

    def small_files(self, prefix: str) -> list[str]:
        return self.remote.small_files(prefix)

    def read_small(self, name: str, limit: int = 65536) -> bytes:
        return self.remote.read_small(name, limit)

    def write_small(self, name: str, data: bytes) -> None:
        self.remote.write_small(name, data)

    def remove_small(self, name: str) -> None:
        self.remote.remove_small(name)

    def exists(self, name: str) -> bool:
        return self.remote.exists(name)

    def ensure_root(self) -> None:
        self.local.ensure_root()
        self.remote.ensure_root()

    def read_manifest(self, step: int) -> bytes:
        return self._read(step, lambda t: t.read_manifest(step))

    def open_payload(self, step: int, name: str, size: int) -> PayloadFile:
        return self._read(step, lambda t: t.open_payload(step, name, size))

    def file_size(self, step: int, name: str) -> int:
        return self._read(step, lambda t: t.file_size(step, name))

    def begin_checkpoint(self, step: int) -> str:
        self._bind()
        return self.local.begin_checkpoint(step)

    def open_for_write(self, path: str) -> AbstractContextManager[BinaryIO]:
        return self.local.open_for_write(path)

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        return self.local.retrying(fn, what)

    def finish_checkpoint(self, directory: str, step: int) -> None:
        self.local.finish_checkpoint(directory, step)
        with self._lock:
            self._durable.discard(step)  # a new copy of this step (a damaged one rewritten): upload it again
            self._pending.add(step)
            self._attempts.pop(step, None)
            self._start()
            self._lock.notify_all()

    def remove_our_files(self, dirpath: str) -> None:
        self.local.remove_our_files(dirpath)

    def delete(self, step: int) -> None:
        self.local.delete(step)
        with self._lock:
            self._pending.discard(step)
            if step in self._durable or step == self._uploading:
                self._remote_deletes.add(step)
                self._start()
                self._lock.notify_all()

    def cleanup(self, listing: Listing) -> None:
        """Leftovers of a crash on both tiers (a partial upload included); the local-only steps are queued."""
        self.local.cleanup(self.local.scan())
        # Not while the uploader sends a step: its directory looks partial (no manifest yet), and deleting its
        # payload just before the manifest lands left a committed checkpoint without payload. The lock keeps the
        # uploader from starting another step meanwhile; what is skipped goes at the next start.
        with self._lock:
            if self._uploading is None:
                try:
                    self.remote.cleanup(self.remote.scan())
                except Exception as e:  # the remote is down: its leftovers go next time
                    log.warning("autockpt: cannot clean up %s (%r)", self.remote.url, e)
        backlog = set(self.local.scan().committed)
        durable = self._remote_steps()
        with self._lock:
            self._durable = durable
            self._pending |= backlog - self._durable
            if self._pending:
                log.info("autockpt: resuming the upload of step(s) %s from %s to %s", sorted(self._pending),
                         self.local.url, self.remote.url)
                self._start()
                self._lock.notify_all()

    # ------------------------------------------------------------------------------------------ waiting
    def wait_uploads(self, timeout: float | None = None) -> bool:
        """Wait until every queued upload is durable; False on timeout. Raises ``SaveError`` once uploads
        failed repeatedly (the local copies stay, to be uploaded later or by ``autockpt sync``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending or self._uploading is not None or self._remote_deletes:
                if self._error is not None and any(  # a failing remote delete too: never a silent hang
                    self._attempts.get(s, 0) >= _GIVE_UP_AFTER for s in self._pending | self._remote_deletes
                ):
                    raise SaveError(
                        f"uploading step(s) {sorted(self._pending)} (deleting {sorted(self._remote_deletes)}) from "
                        f"{self.local.url} to {self.remote.url} "
                        f"failed {_GIVE_UP_AFTER} times, last: {self._error!r}. The local copies are kept; a "
                        f"restart resumes the upload, or run: autockpt sync {self.local.url} {self.remote.url}"
                    )
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.5 if left is None else min(left, 0.5))
        return True

    def close(self) -> None:
        """Stop the uploader thread (after its current request); what is not durable stays local."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    # ------------------------------------------------------------------------------------------ uploader
    def _start(self) -> None:
        if self._thread is None and not self._stop:
            self._thread = threading.Thread(target=self._run, name="autockpt-upload", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and (
                    not (self._pending or self._remote_deletes) or time.monotonic() < self._retry_at
                ):
                    busy = self._pending or self._remote_deletes
                    self._lock.wait(max(0.05, self._retry_at - time.monotonic()) if busy else None)
                if self._stop:
                    return
                if self._remote_deletes:
                    step, deleting = max(self._remote_deletes), True
                else:
                    step, deleting = max(self._pending), False  # newest first
                    self._pending.discard(step)
                    self._uploading = step
            try:
                if deleting:
                    self.remote.delete(step)
                    with self._lock:
                        self._remote_deletes.discard(step)
                        self._durable.discard(step)
                else:
                    self._upload(step)
                    with self._lock:
                        self._uploading = None
                        self._attempts.pop(step, None)
                        self._error = None
                        self._durable.add(step)  # (pruned meanwhile: in _remote_deletes, deleted next)
                    self._prune_local()
                self._retry_at = 0.0
            except Exception as e:  # never raised into training: a warning, and a retry later
                with self._lock:
                    n = self._attempts[step] = self._attempts.get(step, 0) + 1
                    if isinstance(e, LeaseError):  # another writer took over: retrying cannot succeed
                        n = self._attempts[step] = max(n, _GIVE_UP_AFTER)
                    self._error = e
                    if not deleting:
                        self._uploading = None
                        if self.local.exists(os.path.join(step_dirname(step), MANIFEST_NAME)):
                            self._pending.add(step)
                    delay = min(_MAX_BACKOFF, 0.5 * 2**n)
                    self._retry_at = time.monotonic() + delay
                log.warning("autockpt: %s step %d on %s failed (%r); retrying in %.0f s (the local copy is kept)",
                            "deleting" if deleting else "uploading", step, self.remote.url, e, delay)
                self._warn_backlog()
            finally:
                with self._lock:
                    self._lock.notify_all()

    def _upload(self, step: int) -> None:
        """Copy one committed local checkpoint to the remote: payload files, checked, then the manifest."""
        t0 = time.perf_counter()
        raw = self.local.read_manifest(step)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise SaveError(f"{self.local.url} {step_dirname(step)}: manifest too large")
        doc = json.loads(raw)
        files: dict[str, dict[str, Any]] = doc.get("body", doc)["files"]  # the manifest is verified on restore
        directory = self.remote.begin_checkpoint(step)

        def send(name: str) -> None:
            info = files[name]

            def attempt() -> str:
                h = xxhash.xxh3_64()
                src = self.local.open_payload(step, name, int(info["size"]))
                try:
                    with self.remote.open_for_write(self.remote.join(directory, name)) as f:
                        pos = 0
                        while pos < src.size:
                            chunk = src.read(pos, min(_CHUNK, src.size - pos))
                            h.update(chunk)
                            f.write(chunk)
                            pos += len(chunk)
                finally:
                    src.close()
                return str(h.hexdigest())

            digest = self.remote.retrying(attempt, f"uploading {directory}/{name}")
            if "xxh3_64" in info and digest != info["xxh3_64"]:
                raise SaveError(f"{self.local.url} {step_dirname(step)}/{name} does not match its checksum: the "
                                "local copy is damaged")
            size = self.remote.retrying(lambda: self.remote.file_size(step, name), f"checking {directory}/{name}")
            if size != info["size"]:
                raise SaveError(f"{directory}/{name}: {size} bytes arrived, {info['size']} were sent")

        with ThreadPoolExecutor(min(_PARALLEL, max(1, len(files)))) as pool:
            list(pool.map(send, sorted(files)))
        self.remote.check_fence()  # as CheckpointWriter.commit: still the writer, asked of the storage
        self.remote.retrying(lambda: _write_all(self.remote, self.remote.join(directory, MANIFEST_NAME), raw),
                             f"committing {directory}")
        self.remote.finish_checkpoint(directory, step)
        size = sum(int(f["size"]) for f in files.values())
        secs = time.perf_counter() - t0
        log.info("autockpt: step %d is durable on %s: uploaded %.1f MB in %.2f s", step, self.remote.url,
                 size / 1e6, secs)

    def _prune_local(self) -> None:
        """Keep the ``local_max_to_keep`` newest local copies and every one not yet durable."""
        steps = sorted(self.local.scan().committed, reverse=True)
        with self._lock:
            durable = set(self._durable)
        for s in steps[self.local_max_to_keep :]:
            if s in durable:
                self.local.delete(s)
                log.debug("autockpt: removed the local copy of durable step %d", s)

    def _warn_backlog(self) -> None:
        with self._lock:
            waiting = len(self._pending)
            if self._warned_backlog or waiting <= self.local_max_to_keep:
                return
            self._warned_backlog = True
        log.warning("autockpt: %d checkpoints wait in %s for %s to come back; training goes on, and local copies "
                    "pile up only to what the retention policy keeps (max_to_keep, keep_every_n_hours, keep_best)",
                    waiting, self.local.url, self.remote.url)


def _write_all(storage: Storage, path: str, data: bytes) -> None:
    with storage.open_for_write(path) as f:
        f.write(data)


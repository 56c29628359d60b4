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
- deduplicated checkpoints: their shared packs are written to the local tier's ``blobs/``; the uploader sends
  only the packs the remote lacks (a listing of the remote's packs, taken once and then kept up to date: this
  process is the only writer), then the manifest last. Unreferenced packs are collected on each tier from its
  own manifests: locally by the manager after a save (a local checkpoint not yet durable keeps its packs), on
  the remote by the uploader thread, between uploads and only while the writer lease is held (the fence);
- a step held by both tiers is read from the local copy; :meth:`copies` lets the reader fall back to the
  remote copy when the local one does not verify;
- ``local_dir`` is bound to one remote: a marker file records its URL, and a local dir that holds checkpoints
  of another remote is refused.

Under ``torch.distributed`` (:meth:`TieredStorage.join_group`) each rank has its own node-local ``local_dir``: its
local copy of a step holds the full manifest and only the files this rank wrote. Each rank uploads its own
files into the remote step directory and reports their sizes and checksums through the process group's store;
rank 0 writes the remote manifest only once every rank's report matches the manifest, and posts the outcome,
which every rank waits for (bounded by ``rank_timeout`` without progress), so all ranks agree on what is durable.
A rank reads each file of a step from its local copy when it has it, else from the remote.

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
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, Protocol, TypeVar

import xxhash

from autockpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    LeaseError,
    SaveError,
)
from autockpt.storage.base import Fence, Listing, PayloadFile, Storage
from autockpt.storage.blobs import BlobStore
from autockpt.storage.local import LocalStorage
from autockpt.storage.names import MANIFEST_NAME, MAX_MANIFEST_BYTES, step_dirname

log = logging.getLogger("autockpt")
T = TypeVar("T")
MARKER_NAME = ".autockpt-remote.json"
_CHUNK = 8 * 2**20
_PARALLEL = 4  # payload files uploaded at once (s3fs uploads each in multipart chunks)
_GIVE_UP_AFTER = 3  # failed attempts of one step before wait_until_finished() reports the failure
_MAX_BACKOFF = 30.0


@dataclass
class TierGroup:
    """The ranks of a ``torch.distributed`` run sharing one remote tier: this rank, their number, a key-value
    store all of them reach (the process group's, thread-safe) and how long a rank waits for another that makes
    no progress."""

    rank: int
    world_size: int
    store: Any
    rank_timeout: float


class _Gone(Exception):
    """The step was deleted (retention) while the ranks uploaded it."""


class PackFormat(Protocol):
    """What uploading and collecting shared packs must know of the checkpoint format. Storage knows files, not
    formats, so the layer above gives it (``autockpt.collect.PACK_FORMAT``); a tiered storage without it writes
    self-contained checkpoints (``holds_shared_packs`` is False)."""

    def read_manifest(self, storage: Storage, step: int) -> dict[str, Any]:
        """The verified manifest of a committed step."""

    def data_start(self, read: Callable[[int, int], bytes], size: int, where: str) -> int:
        """The offset of a pack's first tensor byte (past its header)."""

    def collect(self, storage: Storage, manifest: Callable[[int], dict[str, Any]]) -> int:
        """Delete the packs of ``storage`` that no committed manifest refers to; the bytes freed."""


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
    def __init__(self, local: Storage, remote: Storage, local_max_to_keep: int = 2,
                 pack_format: PackFormat | None = None) -> None:
        if not isinstance(local, LocalStorage):
            raise InvalidArgumentError(f"local_dir must be a path on a local filesystem, got {local.url!r}")
        self.local, self.remote = local, remote
        self.pack_format = pack_format
        self.holds_shared_packs = pack_format is not None  # packs written locally; those the remote lacks uploaded
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
        self._group: TierGroup | None = None  # set by join_group under torch.distributed
        self._gens: dict[int, int] = {}  # group mode: upload attempts of each step, the same on every rank
        self._remote_packs: dict[str, int] | None = None  # name -> size on the remote; listed when first needed
        self._collect_due = False  # collect unreferenced remote packs (the uploader, under the lease)
        self._collect_at = 0.0  # not before (after a failed collection)
        self._collecting = False
        self._remote_manifests: dict[int, dict[str, Any]] = {}  # read by the remote collection (uploader thread)

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
        if self._group is not None:  # this rank's local copy holds its own files: read the others' remotely
            with self._lock:
                durable = step in self._durable
            return [self, self.remote] if durable else [self]
        local = self.local.exists(os.path.join(step_dirname(step), MANIFEST_NAME))
        with self._lock:
            durable = step in self._durable
        return [s for s, has in ((self.local, local), (self.remote, durable)) if has] or [self.local]

    def _read(self, step: int, fn: Callable[[Storage], T], name: str = MANIFEST_NAME) -> T:
        """``fn`` on the first tier holding ``step``; the next one if the local copy went meanwhile (pruned)."""
        if self._group is not None:
            return self._read_grouped(step, fn, name)
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

    @property
    def pack_storage(self) -> Storage:
        return self.local  # deduplicated saves write their packs locally; the uploader copies them

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
        return self._read(step, lambda t: t.open_payload(step, name, size), name)

    def file_size(self, step: int, name: str) -> int:
        return self._read(step, lambda t: t.file_size(step, name), name)

    def begin_checkpoint(self, step: int) -> str:
        self._bind()
        return self.local.begin_checkpoint(step)

    def open_for_write(self, path: str) -> AbstractContextManager[BinaryIO]:
        return self.local.open_for_write(path)

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        return self.local.retrying(fn, what)

    def finish_checkpoint(self, directory: str, step: int) -> None:
        self.local.finish_checkpoint(directory, step)
        if self._group is not None:  # queued by queue_upload once every rank committed its local copy
            with self._lock:
                self._durable.discard(step)
            return
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
        if self._group is not None and self._group.rank != 0:  # the writer rank deletes the remote copy
            with self._lock:
                self._pending.discard(step)
            return
        if self._group is not None:
            self._say_gone(step)
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
                    remote = self.remote.scan()
                    if self._group is not None:  # the other ranks may be uploading their files of these
                        busy = {step_dirname(s) for s in self._pending}
                        remote.uncommitted = [n for n in remote.uncommitted if n not in busy]
                    self.remote.cleanup(remote)
                except Exception as e:  # the remote is down: its leftovers go next time
                    log.warning("autockpt: cannot clean up %s (%r)", self.remote.url, e)
        if self._group is not None:  # join_group queued the steps complete on every rank
            return
        backlog = set(self.local.scan().committed)
        durable = self._remote_steps()
        with self._lock:
            self._durable = durable
            self._remote_packs = None  # a crash may have left packs of a partial upload: list again
            self._collect_due = True  # ... and those are collected once the lease is held
            self._pending |= backlog - self._durable
            if self._pending:
                log.info("autockpt: resuming the upload of step(s) %s from %s to %s", sorted(self._pending),
                         self.local.url, self.remote.url)
                self._start()
                self._lock.notify_all()

    def _collect_remote(self) -> None:
        assert self.pack_format is not None  # (_collecting_allowed)
        packs = None
        try:
            self.pack_format.collect(self.remote, self._remote_manifest)
            packs = BlobStore(self.remote).packs()  # now, rather than at the next upload (a checkpoint waits)
        finally:
            with self._lock:
                self._remote_packs = packs

    # ------------------------------------------------------------------------------------------ waiting
    def wait_uploads(self, timeout: float | None = None) -> bool:
        """Wait until every queued upload is durable; False on timeout. Raises ``SaveError`` once uploads
        failed repeatedly (the local copies stay, to be uploaded later or by ``autockpt sync``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while (self._pending or self._uploading is not None or self._remote_deletes or self._collecting
                   or (self._collecting_allowed() and self._thread is not None)):
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
                    not (self._pending or self._remote_deletes or self._collecting_allowed())
                    or time.monotonic() < self._retry_at
                ):
                    busy = self._pending or self._remote_deletes or self._collecting_allowed()
                    self._lock.wait(max(0.05, self._retry_at - time.monotonic()) if busy else 1.0)
                if self._stop:
                    return
                collecting = False
                if self._remote_deletes:
                    step, deleting = max(self._remote_deletes), True
                elif self._collecting_allowed():  # after the deletes (its garbage), before the next upload
                    step, deleting, collecting = -1, False, True
                    self._collect_due, self._collecting = False, True
                else:
                    # newest first; in a group the oldest, so that every rank takes the same step whenever
                    # its saves were queued (a rank still busy with step 8 while 12 and 16 were queued would
                    # take 16 while another took 12, and each would wait for the other until rank_timeout)
                    step, deleting = (max if self._group is None else min)(self._pending), False
                    self._pending.discard(step)
                    self._uploading = step
            try:
                if collecting:
                    self._collect_remote()
                elif deleting:
                    self.remote.delete(step)
                    with self._lock:
                        self._remote_deletes.discard(step)
                        self._durable.discard(step)
                        self._remote_manifests.pop(step, None)
                        self._collect_due = True  # its packs may be referenced by no kept checkpoint now
                else:
                    durable = True
                    if self._group is not None:
                        durable = self._upload_group(step)
                    else:
                        self._upload(step)
                    with self._lock:
                        self._uploading = None
                        self._attempts.pop(step, None)
                        self._error = None
                        if durable:
                            self._durable.add(step)  # (pruned meanwhile: in _remote_deletes, deleted next)
                    self._prune_local()
                self._retry_at = 0.0
            except Exception as e:  # never raised into training: a warning, and a retry later
                if collecting:  # the next start or delete collects again; nothing is lost meanwhile
                    log.warning("autockpt: collecting unreferenced packs of %s failed (%r)", self.remote.url, e)
                    with self._lock:
                        self._collect_due = True
                        self._collect_at = time.monotonic() + _MAX_BACKOFF
                    continue
                with self._lock:
                    n = self._attempts[step] = self._attempts.get(step, 0) + 1
                    if isinstance(e, LeaseError):  # another writer took over: retrying cannot succeed
                        n = self._attempts[step] = max(n, _GIVE_UP_AFTER)
                    self._error = e
                    if not deleting:
                        self._uploading = None
                        self._collect_due = True  # packs of the failed upload may have arrived
                        if self.local.exists(os.path.join(step_dirname(step), MANIFEST_NAME)):
                            self._pending.add(step)
                    delay = min(_MAX_BACKOFF, 0.5 * 2**n)
                    self._retry_at = time.monotonic() + delay
                log.warning("autockpt: %s step %d on %s failed (%r); retrying in %.0f s (the local copy is kept)",
                            "deleting" if deleting else "uploading", step, self.remote.url, e, delay)
                self._warn_backlog()
            finally:
                with self._lock:
                    self._collecting = False
                    self._lock.notify_all()

    def _remote_manifest(self, step: int) -> dict[str, Any]:
        assert self.pack_format is not None  # (only the remote collection asks)
        if step not in self._remote_manifests:  # one writer: a committed manifest changes only by deletion
            self._remote_manifests[step] = self.pack_format.read_manifest(self.remote, step)
        return self._remote_manifests[step]

    def _collecting_allowed(self) -> bool:
        """A remote collection is due and may run now: only under the lease (the fence is set once it is held)."""
        return (self._collect_due and self.pack_format is not None and self.remote.fence is not None
                and time.monotonic() >= self._collect_at)

    def _upload(self, step: int) -> None:
        """Copy one committed local checkpoint to the remote: its packs the remote lacks and its payload files,
        checked, then the manifest."""
        t0 = time.perf_counter()
        raw = self.local.read_manifest(step)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise SaveError(f"{self.local.url} {step_dirname(step)}: manifest too large")
        doc = json.loads(raw)
        body = doc.get("body", doc)
        files: dict[str, dict[str, Any]] = body["files"]  # the manifest is verified on restore
        with self._lock:
            remote_packs = self._remote_packs
        if remote_packs is None:
            remote_packs = BlobStore(self.remote).packs()
        packs = {n: int(b["size"]) for n, b in body.get("blobs", {}).items() if remote_packs.get(n) != b["size"]}
        directory = self.remote.begin_checkpoint(step)

        def send(name: str) -> None:
            self._copy_file(step, directory, name, files[name])

        def send_pack(name: str) -> None:
            self._send_pack(step, name, packs[name], body["tensors"])
            with self._lock:
                if self._remote_packs is None:
                    self._remote_packs = dict(remote_packs)
                self._remote_packs[name] = packs[name]

        jobs = [(send, n) for n in sorted(files)] + [(send_pack, n) for n in sorted(packs)]
        with ThreadPoolExecutor(min(_PARALLEL, max(1, len(jobs)))) as pool:
            list(pool.map(lambda job: job[0](job[1]), jobs))
        with self._lock:
            if self._remote_packs is None:
                self._remote_packs = dict(remote_packs)
        self.remote.check_fence()  # as CheckpointWriter.commit: still the writer, asked of the storage
        self.remote.retrying(lambda: _write_all(self.remote, self.remote.join(directory, MANIFEST_NAME), raw),
                             f"committing {directory}")
        self.remote.finish_checkpoint(directory, step)
        self._remote_manifests.pop(step, None)
        size = sum(int(f["size"]) for f in files.values()) + sum(packs.values())
        secs = time.perf_counter() - t0
        log.info("autockpt: step %d is durable on %s: uploaded %.1f MB in %.2f s%s", step, self.remote.url,
                 size / 1e6, secs, f" ({len(packs)} new pack(s); the rest was there)" if body.get("blobs") else "")

    def _send_pack(self, step: int, name: str, size: int, tensors: dict[str, dict[str, Any]]) -> None:
        """Upload one local pack: its tensors' content hashes checked on the local copy, its size on the remote."""
        where = f"{self.local.url} {step_dirname(step)}: pack {name}"
        if self.pack_format is None:
            raise SaveError(f"{where}: uploading shared packs needs the checkpoint format (open this storage "
                            "through CheckpointManager or `autockpt sync`)")
        src = BlobStore(self.local).open(name, size)
        try:
            start = self.pack_format.data_start(src.read, size, where)
            for t in tensors.values():
                b, e = t["offsets"] if t.get("blob") == name else (0, 0)
                if t.get("blob") == name and src.content_hash(start + b, e - b) != t.get("xxh3_128"):
                    raise SaveError(f"{where} does not match its content hashes: the local copy is damaged")

            def copy(f: BinaryIO) -> None:
                pos = 0
                while pos < size:
                    chunk = src.read(pos, min(_CHUNK, size - pos))
                    f.write(chunk)
                    pos += len(chunk)

            remote = BlobStore(self.remote)
            remote.write(name, copy)
        finally:
            src.close()
        got = self.remote.retrying(lambda: remote.size(name), f"checking {remote.path(name)}")
        if got != size:
            raise SaveError(f"{remote.path(name)}: {got} bytes arrived, {size} were sent")

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


    # ------------------------------------------------------------------------------------------ ranks
    @property
    def grouped(self) -> bool:
        """Whether the ranks of a process group share the remote tier (each with its own local dir)."""
        return self._group is not None

    def join_group(self, group: TierGroup, complete: set[int]) -> None:
        """Share the remote tier with the other ranks of a process group. ``complete``: the steps every rank has
        committed locally; those not yet durable are uploaded once :meth:`resume_uploads` is called."""
        self._group = group
        if group.rank != 0:  # rank 0 cleans both tiers as the writer
            self.local.cleanup(self.local.scan())
        with self._lock:
            self._pending |= complete - self._durable

    def resume_uploads(self) -> None:
        """Start uploading the backlog found by :meth:`join_group` (after the writer cleaned up the remote)."""
        with self._lock:
            if self._pending:
                log.info("autockpt: rank %d resumes the upload of step(s) %s from %s to %s",
                         self._group.rank if self._group else 0, sorted(self._pending), self.local.url,
                         self.remote.url)
                self._start()
                self._lock.notify_all()

    def queue_upload(self, step: int) -> None:
        """Upload ``step``, committed locally by every rank (group mode)."""
        with self._lock:
            self._pending.add(step)
            self._attempts.pop(step, None)
            self._start()
            self._lock.notify_all()

    def _read_grouped(self, step: int, fn: Callable[[Storage], T], name: str) -> T:
        """``fn`` on this rank's local copy if it holds file ``name``, else on the remote step directory (its
        files may be there before the remote manifest: they are checked against the manifest's checksums when
        read). A file on neither makes the step not restorable here, which the reader takes as a damaged
        checkpoint and falls back."""
        if self.local.exists(os.path.join(step_dirname(step), name)):
            try:
                return fn(self.local)
            except (CheckpointNotFoundError, FileNotFoundError):
                pass
        try:
            return fn(self.remote)
        except (CheckpointNotFoundError, FileNotFoundError) as e:
            raise CorruptCheckpointError(
                f"{step_dirname(step)} is neither in {self.local.url} nor uploaded to {self.remote.url} ({e}); "
                "it was not committed on every rank, or that rank's local dir is gone") from None

    def _say_gone(self, step: int) -> None:
        assert self._group is not None
        try:
            self._group.store.set(f"{step}/gone", "1")
        except Exception as e:  # the store is gone: the other ranks' waits end on their own
            log.debug("autockpt: cannot tell the ranks that step %d was deleted: %r", step, e)

    def _await(self, key: str, step: int, beat: str | None) -> Any:
        """The JSON value of ``key`` in the group's store, once set; waits while the rank that sets it makes
        progress (``beat`` grows), and at most ``rank_timeout`` seconds without."""
        g = self._group
        assert g is not None
        deadline, last = time.monotonic() + g.rank_timeout, -1
        while True:
            if g.store.check([key]):
                return json.loads(g.store.get(key))
            if g.store.check([f"{step}/gone"]):
                raise _Gone()
            if self._stop:
                raise SaveError(f"closed while waiting for {key!r} of step {step}")
            if beat is not None:
                n = int(g.store.add(beat, 0))
                if n != last:
                    deadline, last = time.monotonic() + g.rank_timeout, n
            if time.monotonic() > deadline:
                raise SaveError(f"waited rank_timeout={g.rank_timeout:g} s for {key!r} without progress")
            time.sleep(0.1)

    def _copy_own(self, step: int, directory: str, name: str, info: dict[str, Any], beat: str) -> list[Any]:
        """Upload one of this rank's files (a heartbeat per chunk for the other ranks' waits); [size, checksum]."""
        assert self._group is not None
        store = self._group.store
        return self._copy_file(step, directory, name, info, lambda: store.add(beat, 1))

    def _copy_file(self, step: int, directory: str, name: str, info: dict[str, Any],
                   on_chunk: Callable[[], Any] | None = None) -> list[Any]:
        """Upload one local payload file of ``step`` into the remote ``directory``, then check the checksum of the
        bytes sent and the size that arrived; returns [size, checksum]."""

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
                        if on_chunk is not None:
                            on_chunk()
            finally:
                src.close()
            return str(h.hexdigest())

        digest = self.remote.retrying(attempt, f"uploading {directory}/{name}")
        if "xxh3_64" in info and digest != info["xxh3_64"]:
            raise SaveError(f"{self.local.url} {step_dirname(step)}/{name} does not match its checksum: the local "
                            "copy is damaged")
        path = self.remote.join(directory, name)
        size = int(self.remote.retrying(lambda: self._remote_size(path), f"checking {path}"))
        if size != info["size"]:
            raise SaveError(f"{path}: {size} bytes arrived, {info['size']} were sent")
        return [size, digest]

    def _remote_size(self, path: str) -> int:
        self.remote.fs.invalidate_cache(path)
        return int(self.remote.fs.size(path))

    def _upload_group(self, step: int) -> bool:
        """One attempt of the ranks at making ``step`` durable; True once rank 0 committed the remote manifest,
        False if the step was deleted meanwhile. Raises (on every rank) if any rank's upload failed."""
        g = self._group
        assert g is not None
        gen = self._gens[step] = self._gens.get(step, -1) + 1  # every rank makes every attempt: they agree
        key = f"{step}/{gen}/"
        t0 = time.perf_counter()
        raw = self.local.read_manifest(step)
        doc = json.loads(raw)
        files: dict[str, dict[str, Any]] = doc.get("body", doc)["files"]
        here = step_dirname(step)
        mine = {n: files[n] for n in sorted(files) if self.local.exists(os.path.join(here, n))}
        beat = f"{key}beat{g.rank}"
        posted = False
        try:
            if g.rank == 0:
                try:
                    directory = self.remote.begin_checkpoint(step)
                except Exception as e:
                    g.store.set(key + "dir", json.dumps({"error": f"rank 0: {e!r}"}))
                    raise
                g.store.set(key + "dir", json.dumps({"dir": directory}))
            else:
                got = self._await(key + "dir", step, f"{key}beat0")
                if "error" in got:
                    raise SaveError(got["error"])
                directory = got["dir"]
            with ThreadPoolExecutor(min(_PARALLEL, max(1, len(mine)))) as pool:
                sent = dict(zip(mine, pool.map(lambda n: self._copy_own(step, directory, n, mine[n], beat), mine),
                                strict=True))
            g.store.set(key + f"r{g.rank}", json.dumps({"ok": sent}))
            posted = True
            if g.rank == 0:
                self._commit_group(step, gen, directory, raw, files)
            else:
                done = self._await(key + "done", step, f"{key}beat0")
                if "error" in done:
                    raise SaveError(f"step {step} did not become durable: {done['error']}")
        except _Gone:
            return False
        except Exception as e:
            why = json.dumps({"error": f"rank {g.rank}: {type(e).__name__}: {e}"})
            try:
                if not posted:  # so that rank 0 does not wait for this rank's report of this attempt
                    g.store.set(key + f"r{g.rank}", why)
                if g.rank == 0 and not g.store.check([key + "done"]):  # nor the others for the outcome
                    g.store.set(key + "done", why)
            except Exception:  # the store is gone with rank 0
                pass
            raise
        size = sum(int(f["size"]) for f in mine.values())
        log.info("autockpt: step %d is durable on %s: rank %d uploaded %.1f MB in %.2f s", step, self.remote.url,
                 g.rank, size / 1e6, time.perf_counter() - t0)
        return True

    def _commit_group(self, step: int, gen: int, directory: str, raw: bytes, files: dict[str, Any]) -> None:
        """Rank 0: wait for every rank's report, check it against the manifest, commit; post the outcome."""
        g = self._group
        assert g is not None
        key = f"{step}/{gen}/"
        try:
            problems: dict[int, str] = {}
            sent: dict[str, Any] = {}
            for r in range(g.world_size):
                try:
                    rep = self._await(key + f"r{r}", step, f"{key}beat{r}")
                except SaveError as e:
                    problems[r] = f"no report ({e})"
                    continue
                if "error" in rep:
                    problems[r] = rep["error"]
                else:
                    sent.update(rep["ok"])
            for name, info in sorted(files.items()):
                if name not in sent and not problems:
                    problems[0] = f"no rank uploaded {name}"
                elif name in sent and sent[name] != [info["size"], info.get("xxh3_64", sent[name][1])]:
                    problems[0] = f"{name} arrived as {sent[name]}, the manifest says {info['size']} bytes"
            if not problems:  # still all there (a cleanup never removes them, but verify before the commit)
                for name, info in files.items():
                    path = self.remote.join(directory, name)
                    if self.remote.retrying(partial(self._remote_size, path), f"checking {path}") != info["size"]:
                        problems[0] = f"{path} is not {info['size']} bytes"
            if problems:
                raise SaveError("; ".join(f"rank {r}: {m}" for r, m in sorted(problems.items())))
            self.remote.check_fence()
            self.remote.retrying(lambda: _write_all(self.remote, self.remote.join(directory, MANIFEST_NAME), raw),
                                 f"committing {directory}")
            self.remote.finish_checkpoint(directory, step)
        except _Gone:
            raise
        except Exception as e:
            g.store.set(key + "done", json.dumps({"error": f"{e}"}))
            raise
        g.store.set(key + "done", json.dumps({"ok": True}))


def _write_all(storage: Storage, path: str, data: bytes) -> None:
    with storage.open_for_write(path) as f:
        f.write(data)


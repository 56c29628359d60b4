"""``ObjectStoreStorage``: checkpoints on any other fsspec filesystem (s3://, gs://, memory://), manifest last.

One job: the object-store commit protocol. Such stores may copy on rename, so the payload is written in place
and ``manifest.json`` last: its presence, with matching sizes and checksums, is the commit. Transient errors are
retried with bounded backoff. Imports ``autockpt.errors`` and the package's own modules.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

from fsspec.implementations.memory import MemoryFileSystem

from autockpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from autockpt.storage.base import Listing, PayloadFile, Storage
from autockpt.storage.names import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    STEP_RE,
    TMP_RE,
    step_dirname,
    valid_file_name,
)
from autockpt.storage.retry import retry

log = logging.getLogger("autockpt")
T = TypeVar("T")
_MEMORY_LOCK = threading.Lock()  # memory:// lives in this process: a lock makes its check-then-write atomic


class ObjectStoreStorage(Storage):
    """One checkpoint directory (a prefix) on an fsspec filesystem without an atomic rename."""

    atomic_rename = False

    def __init__(self, url: str, root: str, fs: Any) -> None:
        self.url, self.root, self.fs = url, root, fs
        self._exclusive: bool | None = None

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def join(self, directory: str, name: str) -> str:
        return posixpath.join(directory, name)

    # ------------------------------------------------------------------------------------------ listing
    def _names(self) -> list[str]:
        # Another process may have written since we last listed. invalidate_cache(p) forgets p and its parents,
        # not the listings below p that a glob cached (s3fs keeps those until told): so they go too, and every
        # read of a file forgets the file's own path first, or a checkpoint completed since would look partial.
        self.fs.invalidate_cache(self.root)
        cache, below = getattr(self.fs, "dircache", None), self.root.rstrip("/") + "/"
        if cache is not None:
            for key in [k for k in list(cache) if str(k).startswith(below)]:
                cache.pop(key, None)
        try:
            listed = retry(lambda: self.fs.ls(self.root, detail=False), f"listing {self.url}")
            return [posixpath.basename(p.rstrip("/")) for p in listed]
        except FileNotFoundError:
            return []

    def scan(self) -> Listing:
        listing = Listing()
        names = self._names()
        manifests: set[str] = set()
        if any(STEP_RE.match(n) for n in names):
            try:
                found = retry(lambda: self.fs.glob(posixpath.join(self.root, "step_*", MANIFEST_NAME)),
                              f"listing {self.url}")
            except FileNotFoundError:
                found = []
            manifests = {posixpath.basename(posixpath.dirname(p)) for p in found}
        for name in names:
            m = STEP_RE.match(name)
            if m:
                if name in manifests:
                    listing.committed[int(m.group(1))] = name
                else:
                    listing.uncommitted.append(name)
            elif TMP_RE.match(name):
                listing.temporary.append(name)
        return listing

    def root_exists(self) -> bool:
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.isdir(self.root))

    def root_is_file(self) -> bool:
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.isfile(self.root))

    # ------------------------------------------------------------------------------------------ small files
    def read_small(self, name: str, limit: int = 65536) -> bytes:
        return bytes(self.fs.cat_file(self.path(name)))

    def write_small(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(name), data)

    @property
    def exclusive_create(self) -> bool:
        """s3fs sends ``If-None-Match: *`` (S3 and compatible servers since 2024): probed once, since a server
        may ignore the header; memory:// is atomic under a process lock; other filesystems: no."""
        if self._exclusive is None:
            if isinstance(self.fs, MemoryFileSystem):
                self._exclusive = True
            elif type(self.fs).__module__.split(".")[0] == "s3fs":
                self._exclusive = self._probe()
            else:
                self._exclusive = False
        return self._exclusive

    def _probe(self) -> bool:
        """Whether the server refuses a second conditional create of one object (it enforces If-None-Match)."""
        name = f".autockpt-probe-{secrets.token_hex(4)}"
        try:
            if not self._conditional_put(name, b"1"):
                return False
            return not self._conditional_put(name, b"2")
        finally:
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

    def _conditional_put(self, name: str, data: bytes) -> bool:
        try:
            retry(lambda: self.fs.pipe_file(self.path(name), data, mode="create"), f"creating {self.path(name)}")
            return True
        except FileExistsError:
            return False

    def create_small(self, name: str, data: bytes) -> bool:
        path = self.path(name)
        if isinstance(self.fs, MemoryFileSystem):
            with _MEMORY_LOCK:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
        if self.exclusive_create:
            return self._conditional_put(name, data)
        self.fs.invalidate_cache(self.root)
        if self.fs.exists(path):  # no atomic create here: a check, then a write (the lease warns once)
            return False
        self.fs.pipe_file(path, data)
        return True

    def small_files(self, prefix: str) -> list[str]:
        return [n for n in self._names() if n.startswith(prefix)]

    def remove_small(self, name: str) -> None:
        self.fs.rm_file(self.path(name))

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.exists(self.path(name)))

    def ensure_root(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------------------------------------ reading
    def read_manifest(self, step: int) -> bytes:
        path = self.path(step_dirname(step), MANIFEST_NAME)
        self.fs.invalidate_cache(path)
        try:
            size = retry(lambda: self.fs.size(path), f"reading {path}")
            if size is not None and size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(f"{path}: manifest of {size} bytes exceeds the limit")
            return bytes(retry(lambda: self.fs.cat_file(path), f"reading {path}"))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {step} in {self.url}") from None

    def open_payload(self, step: int, name: str, size: int) -> PayloadFile:
        if not valid_file_name(name):
            raise CorruptCheckpointError(f"refusing to open payload file {name!r}")
        path = self.path(step_dirname(step), name)
        self.fs.invalidate_cache(path)  # the file's directory and its parents: see _names
        box: list[bytearray] = []

        def download() -> int:
            with self.fs.open(path, "rb") as f:
                if f.size == size:
                    buf = bytearray(size)
                    _fill(f, memoryview(buf), path)
                    box[:] = [buf]
                return int(f.size)

        try:
            actual = retry(download, f"reading {path}")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: payload file is missing") from None
        if actual != size:
            raise CorruptCheckpointError(f"{path}: {actual} bytes, the manifest says {size}")
        return PayloadFile(path, size, buf=box[0])

    def file_size(self, step: int, name: str) -> int:
        path = self.path(step_dirname(step), name)
        self.fs.invalidate_cache(path)
        return int(self.fs.size(path))

    # ------------------------------------------------------------------------------------------ writing
    def begin_checkpoint(self, step: int) -> str:
        self.guard()
        directory = self.path(step_dirname(step))
        retry(lambda: self.fs.makedirs(directory, exist_ok=True), f"creating {directory}")
        manifest = posixpath.join(directory, MANIFEST_NAME)
        if retry(lambda: self.fs.exists(manifest), f"checking {manifest}"):  # replacing a damaged one
            retry(lambda: self.fs.rm_file(manifest), f"removing {manifest}")
        return directory

    @contextmanager
    def open_for_write(self, path: str) -> Iterator[BinaryIO]:
        self.guard()
        f = self.fs.open(path, "wb")
        try:
            yield f
            self.guard()  # the object appears when the file closes: ask again just before
        except BaseException:
            _discard(f)  # not uploaded: a writer that lost its lease must not replace anything
            raise
        f.close()

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, what)

    def finish_checkpoint(self, directory: str, step: int) -> None:
        return None  # the manifest, written last, is the commit

    # ------------------------------------------------------------------------------------------ deleting
    def remove_our_files(self, dirpath: str) -> None:
        self.guard()
        try:
            self.fs.invalidate_cache(dirpath)
            listed = retry(lambda: self.fs.ls(dirpath, detail=False), f"listing {dirpath}")
            names = [posixpath.basename(p) for p in listed]
        except FileNotFoundError:
            return
        if MANIFEST_NAME in names:
            retry(lambda: self.fs.rm_file(posixpath.join(dirpath, MANIFEST_NAME)), f"deleting {dirpath}")
        ours = [posixpath.join(dirpath, n) for n in names if valid_file_name(n)]
        if ours:
            retry(lambda: self.fs.rm(ours), f"deleting {dirpath}")
        if len(ours) + (MANIFEST_NAME in names) < len(names):
            log.warning("autockpt left %s in place: it holds files autockpt did not write", dirpath)
            return
        try:
            if self.fs.isdir(dirpath):
                self.fs.rmdir(dirpath)
        except (FileNotFoundError, OSError, NotImplementedError):
            pass

    def delete(self, step: int) -> None:
        self.remove_our_files(self.path(step_dirname(step)))


def _fill(f: Any, view: memoryview, path: str) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CorruptCheckpointError(f"{path}: ended after {got} of {len(view)} bytes")
        got += n


def _discard(f: Any) -> None:
    """Throw away a file being written instead of uploading it at close (where the filesystem can)."""
    try:
        f.discard()
        f.closed = True  # fsspec's buffered files: close() and __del__ then upload nothing
    except Exception:
        pass

"""Where checkpoints live: any fsspec URL, with a commit protocol chosen by what the filesystem can do.

- A filesystem backed by the operating system (fsspec's ``LocalFileSystem``: plain paths, ``file://``) has an
  atomic ``rename`` within a directory: a checkpoint is written into ``.tmp-step_N-XXXXXXXX`` inside the same
  parent, every file is fsynced, the directory is renamed to ``step_N`` and the parent is fsynced.
- Any other filesystem (object stores, ``memory://``) may copy on rename, so the payload is written in place
  and ``manifest.json`` last: its presence, with matching sizes and checksums, is the commit.

Everything autockpt writes has a name it recognises (``step_N``, ``.tmp-step_N-X``, ``.tmp-del-step_N-X``,
``manifest.json``, ``*.safetensors``); it never deletes anything else.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from autockpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from autockpt.format import MANIFEST_NAME, MAX_MANIFEST_BYTES, valid_file_name

log = logging.getLogger("autockpt")

STEP_RE = re.compile(r"^step_(\d{10,})$")
TMP_RE = re.compile(r"^\.tmp-(?:del-)?step_\d{10,}-[0-9a-f]{8}$")


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


def step_dirname(step: int) -> str:
    return f"step_{step:010d}"


@dataclass
class Listing:
    """What a scan of the checkpoint directory found."""

    committed: dict[int, str] = field(default_factory=dict)  # step -> dir name, manifest present
    uncommitted: list[str] = field(default_factory=list)  # step dirs without a manifest (object stores)
    temporary: list[str] = field(default_factory=list)  # our temporary / being-deleted dirs


class Storage:
    """One checkpoint directory on one fsspec filesystem."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self.url = os.fspath(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/") or "/"
        # Capability, not protocol name: an OS-backed filesystem renames a directory atomically.
        self.atomic_rename = isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        if self.atomic_rename:
            return os.path.join(self.root, *parts)
        return posixpath.join(self.root, *parts)

    def fsync_dir(self, path: str) -> None:
        if not self.atomic_rename:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------ listing
    def _names(self) -> list[str]:
        if self.atomic_rename:
            try:
                return os.listdir(self.root)
            except (FileNotFoundError, NotADirectoryError):
                return []
        self.fs.invalidate_cache(self.root)  # another process may have written since we last listed
        try:
            listed = retry(lambda: self.fs.ls(self.root, detail=False), f"listing {self.url}")
            return [posixpath.basename(p.rstrip("/")) for p in listed]
        except FileNotFoundError:
            return []

    def scan(self) -> Listing:
        listing = Listing()
        names = self._names()
        manifests: set[str] = set()
        if not self.atomic_rename and any(STEP_RE.match(n) for n in names):
            try:
                found = retry(lambda: self.fs.glob(posixpath.join(self.root, "step_*", MANIFEST_NAME)),
                              f"listing {self.url}")
            except FileNotFoundError:
                found = []
            manifests = {posixpath.basename(posixpath.dirname(p)) for p in found}
        for name in names:
            m = STEP_RE.match(name)
            if m:
                committed = (
                    os.path.isfile(self.path(name, MANIFEST_NAME)) if self.atomic_rename else name in manifests
                )
                if committed:
                    listing.committed[int(m.group(1))] = name
                else:
                    listing.uncommitted.append(name)
            elif TMP_RE.match(name):
                listing.temporary.append(name)
        return listing

    # ------------------------------------------------------------------------------------------ reading
    def open_local(self, step: int, name: str) -> int:
        """A read-only descriptor of a regular file directly inside a local step directory.

        Symlinks (of the step directory or of the file) are not followed, so a checkpoint never makes autockpt
        read outside its directory; FIFOs, devices and directories are refused without blocking.
        """
        where = self.path(step_dirname(step), name)
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        try:
            dfd = os.open(self.path(step_dirname(step)), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptCheckpointError(f"{where}: the step directory is a symlink or not a directory") from None
            raise
        try:
            fd = os.open(name, os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0), dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise CorruptCheckpointError(f"{where}: not a regular file (a symlink?)") from None
            raise
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptCheckpointError(f"{where}: not a regular file")
        return fd

    def read_manifest(self, step: int) -> bytes:
        path = self.path(step_dirname(step), MANIFEST_NAME)
        try:
            if self.atomic_rename:
                with os.fdopen(self.open_local(step, MANIFEST_NAME), "rb") as f:
                    return f.read(MAX_MANIFEST_BYTES + 1)
            size = retry(lambda: self.fs.size(path), f"reading {path}")
            if size is not None and size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(f"{path}: manifest of {size} bytes exceeds the limit")
            return bytes(retry(lambda: self.fs.cat_file(path), f"reading {path}"))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {step} in {self.url}") from None

    # ------------------------------------------------------------------------------------------ writing
    @contextmanager
    def writer(self, step: int) -> Iterator[CheckpointWriter]:
        """Write one checkpoint; ``commit()`` must be called inside. On any error the partial files go."""
        w = CheckpointWriter(self, step)
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        if not w.committed:
            w.abort()

    # ------------------------------------------------------------------------------------------ deleting
    def _remove_our_files(self, dirpath: str) -> None:
        """Delete the files autockpt writes inside ``dirpath`` (manifest first), then the directory if empty."""
        if self.atomic_rename:
            try:
                names = os.listdir(dirpath)
            except FileNotFoundError:
                return
            for name in sorted(names, key=lambda n: n != MANIFEST_NAME):
                path = os.path.join(dirpath, name)
                if (name == MANIFEST_NAME or valid_file_name(name)) and not stat.S_ISDIR(os.lstat(path).st_mode):
                    os.unlink(path)  # a directory under one of our names was not written by autockpt: kept
            try:
                os.rmdir(dirpath)
            except OSError:
                log.warning("autockpt left %s in place: it holds files autockpt did not write", dirpath)
            return
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
        """Uncommit, then remove, one checkpoint."""
        name = step_dirname(step)
        if self.atomic_rename:
            trash = self.path(f".tmp-del-{name}-{secrets.token_hex(4)}")
            try:
                os.rename(self.path(name), trash)
            except FileNotFoundError:
                return
            self.fsync_dir(self.root)
            self._remove_our_files(trash)
        else:
            self._remove_our_files(self.path(name))

    def cleanup(self, listing: Listing) -> None:
        """Remove temporary directories and uncommitted step directories left by a crash."""
        for name in listing.temporary + listing.uncommitted:
            log.info("autockpt: removing leftover %s from an interrupted save", self.path(name))
            self._remove_our_files(self.path(name))


class CheckpointWriter:
    """Files of one checkpoint being written; see :meth:`Storage.writer`."""

    def __init__(self, storage: Storage, step: int) -> None:
        self.storage = storage
        self.step = step
        self.final = storage.path(step_dirname(step))
        self.committed = False
        if storage.atomic_rename:
            os.makedirs(storage.root, exist_ok=True)
            self.dir = storage.path(f".tmp-{step_dirname(step)}-{secrets.token_hex(4)}")
            os.mkdir(self.dir)
        else:
            self.dir = self.final
            retry(lambda: storage.fs.makedirs(self.dir, exist_ok=True), f"creating {self.dir}")
            manifest = posixpath.join(self.dir, MANIFEST_NAME)
            if retry(lambda: storage.fs.exists(manifest), f"checking {manifest}"):  # replacing a damaged one
                retry(lambda: storage.fs.rm_file(manifest), f"removing {manifest}")

    @classmethod
    def attach(cls, storage: Storage, directory: str) -> CheckpointWriter:
        """A writer of files into a checkpoint directory that another process created (and will commit)."""
        w = cls.__new__(cls)
        w.storage, w.step, w.final, w.dir, w.committed = storage, -1, directory, directory, False
        return w

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        """A file to write; durable (fsynced) once the ``with`` block exits without error."""
        if self.storage.atomic_rename:
            with open(os.path.join(self.dir, name), "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        else:
            with self.storage.fs.open(posixpath.join(self.dir, name), "wb") as f:
                yield f

    def write_file(self, name: str, write: Callable[[BinaryIO], T]) -> T:
        """Write one whole file with ``write(f)``; on object stores a transient failure writes it again."""
        def attempt() -> T:
            with self.open(name) as f:
                return write(f)

        return attempt() if self.storage.atomic_rename else retry(attempt, f"writing {self.dir}/{name}")

    def commit(self, manifest: bytes) -> None:
        """Write the manifest and make the checkpoint visible, atomically where the filesystem can."""
        st = self.storage
        self.write_file(MANIFEST_NAME, lambda f: f.write(manifest))
        if st.atomic_rename:
            st.fsync_dir(self.dir)
            if os.path.exists(self.final):  # a damaged checkpoint of the same step: move it out of the way
                trash = st.path(f".tmp-del-{step_dirname(self.step)}-{secrets.token_hex(4)}")
                os.rename(self.final, trash)
                os.rename(self.dir, self.final)
                st.fsync_dir(st.root)
                st._remove_our_files(trash)
            else:
                os.rename(self.dir, self.final)
                st.fsync_dir(st.root)
        self.committed = True

    def abort(self) -> None:
        try:
            self.storage._remove_our_files(self.dir)
        except Exception as e:  # the original error matters more; leftovers are cleaned at the next start
            log.warning("autockpt could not remove partial checkpoint %s: %s", self.dir, e)

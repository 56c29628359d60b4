"""``LocalStorage``: checkpoints on a filesystem of the operating system, committed by an atomic rename.

One job: the local commit protocol. Files are written into ``.tmp-step_N-XXXXXXXX`` in the same parent and
fsynced, the directory is renamed to ``step_N`` and the parent is fsynced. Reads never follow symlinks and
refuse FIFOs and devices. Imports ``autockpt.errors`` and the package's own modules.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

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

log = logging.getLogger("autockpt")
T = TypeVar("T")


class LocalStorage(Storage):
    """One checkpoint directory on a local (or network-mounted, POSIX) filesystem."""

    atomic_rename = True

    def __init__(self, url: str, root: str, fs: Any) -> None:
        self.url, self.root, self.fs = url, root, fs

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def join(self, directory: str, name: str) -> str:
        return os.path.join(directory, name)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------ listing
    def scan(self) -> Listing:
        listing = Listing()
        try:
            names = os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            names = []
        for name in names:
            m = STEP_RE.match(name)
            if m:
                if os.path.isfile(self.path(name, MANIFEST_NAME)):
                    listing.committed[int(m.group(1))] = name
                else:
                    listing.uncommitted.append(name)
            elif TMP_RE.match(name):
                listing.temporary.append(name)
        return listing

    def root_exists(self) -> bool:
        return os.path.isdir(self.root)

    def root_is_file(self) -> bool:
        return os.path.exists(self.root) and not os.path.isdir(self.root)

    # ------------------------------------------------------------------------------------------ small files
    def read_small(self, name: str, limit: int = 65536) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read(limit)

    def _temp_beside(self, name: str, data: bytes, durable: bool) -> tuple[str, str]:
        """``data`` written to a new temporary file beside ``name`` (fsynced if ``durable``): (path, temp path)."""
        os.makedirs(self.root, exist_ok=True)
        path = self.path(name)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        return path, tmp

    def write_small(self, name: str, data: bytes) -> None:
        path, tmp = self._temp_beside(name, data, durable=False)
        os.replace(tmp, path)

    @property
    def exclusive_create(self) -> bool:
        return True

    def create_small(self, name: str, data: bytes) -> bool:
        path, tmp = self._temp_beside(name, data, durable=True)
        try:  # link() never replaces: of all processes linking one name, exactly one succeeds (NFS too)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self._create_excl(path, data)  # a filesystem without hard links: O_EXCL
        finally:
            os.unlink(tmp)

    @staticmethod
    def _create_excl(path: str, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def small_files(self, prefix: str) -> list[str]:
        try:
            return [n for n in os.listdir(self.root) if n.startswith(prefix) and ".tmp-" not in n]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_small(self, name: str) -> None:
        os.unlink(self.path(name))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def ensure_root(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------------------------------------ reading
    def _open_in_step(self, step: int, name: str) -> int:
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
        try:
            with os.fdopen(self._open_in_step(step, MANIFEST_NAME), "rb") as f:
                return f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {step} in {self.url}") from None

    def open_payload(self, step: int, name: str, size: int) -> PayloadFile:
        if not valid_file_name(name):
            raise CorruptCheckpointError(f"refusing to open payload file {name!r}")
        path = self.path(step_dirname(step), name)
        try:
            fd = self._open_in_step(step, name)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: payload file is missing") from None
        f = PayloadFile(path, size, fd=fd)
        actual = os.fstat(fd).st_size
        if actual != size:
            f.close()
            raise CorruptCheckpointError(f"{path}: {actual} bytes, the manifest says {size}")
        return f

    def file_size(self, step: int, name: str) -> int:
        return os.path.getsize(self.path(step_dirname(step), name))

    # ------------------------------------------------------------------------------------------ writing
    def begin_checkpoint(self, step: int) -> str:
        self.guard()
        os.makedirs(self.root, exist_ok=True)
        directory = self.path(f".tmp-{step_dirname(step)}-{secrets.token_hex(4)}")
        os.mkdir(directory)
        return directory

    @contextmanager
    def open_for_write(self, path: str) -> Iterator[BinaryIO]:
        self.guard()
        with open(path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        return fn()  # a local error is not transient

    def finish_checkpoint(self, directory: str, step: int) -> None:
        final = self.path(step_dirname(step))
        self.fsync_dir(directory)
        self.guard()
        if os.path.exists(final):  # a damaged checkpoint of the same step: move it out of the way
            trash = self.path(f".tmp-del-{step_dirname(step)}-{secrets.token_hex(4)}")
            os.rename(final, trash)
            os.rename(directory, final)
            self.fsync_dir(self.root)
            self.remove_our_files(trash)
        else:
            os.rename(directory, final)
            self.fsync_dir(self.root)

    # ------------------------------------------------------------------------------------------ deleting
    def remove_our_files(self, dirpath: str) -> None:
        self.guard()
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

    def delete(self, step: int) -> None:
        self.guard()
        name = step_dirname(step)
        trash = self.path(f".tmp-del-{name}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path(name), trash)
        except FileNotFoundError:
            return
        self.fsync_dir(self.root)
        self.remove_our_files(trash)

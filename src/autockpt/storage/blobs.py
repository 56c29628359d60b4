"""The content area of a checkpoint directory: pack files under ``DIR/blobs/``, shared by checkpoints.

One job: put, list, open and remove pack files (``blobs/<name>.safetensors``), whatever the storage. A pack is
written whole and becomes visible whole: on local disks into ``blobs/.tmp-<name>``, fsynced, then renamed and
the directory fsynced; on object stores in place (a PUT is atomic). Which checkpoints refer to a pack is the
manifests' business (``autockpt.collect``); this module never decides what to delete. Imports
``autockpt.errors`` and the package's own modules.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from autockpt.errors import CorruptCheckpointError
from autockpt.storage.base import PayloadFile, Storage
from autockpt.storage.names import valid_file_name
from autockpt.storage.retry import retry

T = TypeVar("T")
BLOBS_DIR = "blobs"
_TMP = ".tmp-"


class BlobStore:
    """The pack files of one checkpoint directory.

    ```python
    from autockpt.storage import open_storage
    from autockpt.storage.blobs import BlobStore
    blobs = BlobStore(open_storage("memory://blob_demo"))
    blobs.write("p1.safetensors", lambda f: f.write(b"x" * 8))
    assert blobs.packs() == {"p1.safetensors": 8}
    blobs.remove("p1.safetensors")
    assert blobs.packs() == {}
    ```
    """

    def __init__(self, storage: Storage) -> None:
        storage = storage.pack_storage  # a tiered storage writes its packs to its local tier
        self.storage = storage
        self.dir = storage.path(BLOBS_DIR)
        self.local = storage.atomic_rename

    def path(self, name: str) -> str:
        return self.storage.join(self.dir, name)

    def packs(self) -> dict[str, int]:
        """Every committed pack: name -> size (as of now)."""
        return {n: s for n, s in self._entries().items() if not n.startswith(_TMP)}

    def leftovers(self) -> list[str]:
        """Temporary packs of interrupted writes (local disks only)."""
        return [n for n in self._entries() if n.startswith(_TMP)]

    def _entries(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.local:
            try:
                with os.scandir(self.dir) as it:
                    for e in it:
                        name = e.name[len(_TMP):] if e.name.startswith(_TMP) else e.name
                        if valid_file_name(name) and e.is_file(follow_symlinks=False):
                            out[e.name] = e.stat(follow_symlinks=False).st_size
            except (FileNotFoundError, NotADirectoryError):
                pass
            return out
        fs = self.storage.fs
        fs.invalidate_cache(self.dir)
        try:
            listed = retry(lambda: fs.ls(self.dir, detail=True), f"listing {self.dir}")
        except FileNotFoundError:
            return out
        for info in listed:
            name = posixpath.basename(str(info["name"]).rstrip("/"))
            if valid_file_name(name) and info.get("type") == "file":
                out[name] = int(info["size"])
        return out

    def size(self, name: str) -> int:
        """The size of one pack; FileNotFoundError if missing."""
        if self.local:
            return os.stat(self.path(name), follow_symlinks=False).st_size
        self.storage.fs.invalidate_cache(self.path(name))  # see ObjectStoreStorage._names
        return int(self.storage.fs.size(self.path(name)))

    def open(self, name: str, size: int) -> PayloadFile:
        """A pack to read; CorruptCheckpointError if missing, not a regular file or not ``size`` bytes."""
        if not valid_file_name(name):
            raise CorruptCheckpointError(f"refusing to open pack {name!r}")
        path = self.path(name)
        if self.local:
            nofollow = getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(path, os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0))
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{path}: pack file is missing") from None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise CorruptCheckpointError(f"{path}: not a regular file (a symlink?)") from None
                raise
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                os.close(fd)
                raise CorruptCheckpointError(f"{path}: {st.st_size} bytes (or not a file), the manifest says {size}")
            return PayloadFile(path, size, fd=fd)
        fs = self.storage.fs
        fs.invalidate_cache(path)  # see ObjectStoreStorage._names

        def download() -> bytearray:
            with fs.open(path, "rb") as f:
                if f.size != size:
                    raise CorruptCheckpointError(f"{path}: {f.size} bytes, the manifest says {size}")
                return bytearray(f.read())

        try:
            buf = retry(download, f"reading {path}")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: pack file is missing") from None
        if len(buf) != size:
            raise CorruptCheckpointError(f"{path}: ended after {len(buf)} of {size} bytes")
        return PayloadFile(path, size, buf=buf)

    def write(self, name: str, write: Callable[[BinaryIO], T]) -> T:
        """Write one whole pack with ``write(f)``; it is visible (and durable) only once complete."""
        if not valid_file_name(name):
            raise ValueError(f"invalid pack name {name!r}")
        if not self.local:
            def attempt() -> T:
                with self.storage.open_for_write(self.path(name)) as f:
                    return write(f)
            return self.storage.retrying(attempt, f"writing {self.path(name)}")
        os.makedirs(self.dir, exist_ok=True)
        tmp = self.path(_TMP + name)
        try:
            with self.storage.open_for_write(tmp) as f:  # fsynced on exit
                out = write(f)
            os.rename(tmp, self.path(name))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return out

    def remove(self, name: str) -> None:
        """Delete one pack (or temporary pack); a missing one is not an error."""
        if not (valid_file_name(name) or (name.startswith(_TMP) and valid_file_name(name[len(_TMP):]))):
            raise ValueError(f"refusing to remove {name!r}: not a pack name")
        self.storage.guard()  # a writer that lost the lease deletes nothing (see autockpt.lease)
        try:
            if self.local:
                os.unlink(self.path(name))
            else:
                retry(lambda: self.storage.fs.rm_file(self.path(name)), f"deleting {self.path(name)}")
        except FileNotFoundError:
            pass

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

import logging
import mmap
import os
import posixpath
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from autockpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from autockpt.format import MANIFEST_NAME, MAX_MANIFEST_BYTES, valid_file_name

log = logging.getLogger("autockpt")

STEP_RE = re.compile(r"^step_(\d{10,})$")
TMP_RE = re.compile(r"^\.tmp-(?:del-)?step_\d{10,}-[0-9a-f]{8}$")


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
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def scan(self) -> Listing:
        listing = Listing()
        names = self._names()
        manifests: set[str] = set()
        if not self.atomic_rename and any(STEP_RE.match(n) for n in names):
            try:
                found = self.fs.glob(posixpath.join(self.root, "step_*", MANIFEST_NAME))
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
    def read_manifest(self, step: int) -> bytes:
        path = self.path(step_dirname(step), MANIFEST_NAME)
        try:
            size = os.path.getsize(path) if self.atomic_rename else self.fs.size(path)
            if size is not None and size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(f"{path}: manifest of {size} bytes exceeds the limit")
            if self.atomic_rename:
                with open(path, "rb") as f:
                    return f.read(MAX_MANIFEST_BYTES + 1)
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {step} in {self.url}") from None

    def read_payload(self, step: int, name: str, expected_size: int) -> Any:
        """The whole file as a writable buffer (a private mmap locally), after checking its size."""
        if not valid_file_name(name):
            raise CorruptCheckpointError(f"refusing to open payload file {name!r}")
        path = self.path(step_dirname(step), name)
        try:
            if self.atomic_rename:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != expected_size:
                        raise CorruptCheckpointError(f"{path}: {size} bytes, the manifest says {expected_size}")
                    if size == 0:
                        return bytearray()
                    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            with self.fs.open(path, "rb") as f:
                size = f.size
                if size != expected_size:
                    raise CorruptCheckpointError(f"{path}: {size} bytes, the manifest says {expected_size}")
                buf = bytearray(size)
                view, got = memoryview(buf), 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        raise CorruptCheckpointError(f"{path}: ended after {got} of {size} bytes")
                    got += n
                return buf
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: payload file is missing") from None

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
                if name == MANIFEST_NAME or valid_file_name(name):
                    os.unlink(os.path.join(dirpath, name))
            try:
                os.rmdir(dirpath)
            except OSError:
                log.warning("autockpt left %s in place: it holds files autockpt did not write", dirpath)
            return
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(dirpath, detail=False)]
        except FileNotFoundError:
            return
        if MANIFEST_NAME in names:
            self.fs.rm_file(posixpath.join(dirpath, MANIFEST_NAME))
        ours = [posixpath.join(dirpath, n) for n in names if valid_file_name(n)]
        if ours:
            self.fs.rm(ours)
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
            storage.fs.makedirs(self.dir, exist_ok=True)
            if storage.fs.exists(posixpath.join(self.dir, MANIFEST_NAME)):  # replacing a damaged checkpoint
                storage.fs.rm_file(posixpath.join(self.dir, MANIFEST_NAME))

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

    def commit(self, manifest: bytes) -> None:
        """Write the manifest and make the checkpoint visible, atomically where the filesystem can."""
        st = self.storage
        with self.open(MANIFEST_NAME) as f:
            f.write(manifest)
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

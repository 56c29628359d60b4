"""Where checkpoints live: the ``Storage`` interface and its two implementations, chosen by capability.

- A filesystem backed by the operating system (fsspec's ``LocalFileSystem``: plain paths, ``file://``) has an
  atomic ``rename`` within a directory: :class:`LocalStorage` writes into ``.tmp-step_N-XXXXXXXX``, fsyncs,
  renames to ``step_N`` and fsyncs the parent.
- Any other filesystem (object stores, ``memory://``) may copy on rename: :class:`ObjectStoreStorage` writes
  the payload in place and ``manifest.json`` last: its presence, with matching sizes and checksums, is the
  commit.

Everything autockpt writes has a name it recognises (``step_N``, ``.tmp-step_N-X``, ``.tmp-del-step_N-X``,
``manifest.json``, ``*.safetensors``, packs in ``blobs/``); it never deletes anything else. ``blobs`` holds the
:class:`BlobStore`: pack files of tensors shared by deduplicated checkpoints. This package is the only place that
knows local from remote. It imports only ``autockpt.errors`` (and fsspec).
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from autockpt.storage.base import CheckpointWriter, Fence, Listing, PayloadFile, Storage
from autockpt.storage.blobs import BLOBS_DIR, BlobStore
from autockpt.storage.local import LocalStorage
from autockpt.storage.names import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    STEP_RE,
    TMP_RE,
    step_dirname,
    valid_file_name,
)
from autockpt.storage.objectstore import ObjectStoreStorage
from autockpt.storage.retry import RETRIES, access_problem, retry, transient
from autockpt.storage.tiered import PackFormat, TieredStorage


def open_storage(
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    local_max_to_keep: int = 2,
    pack_format: PackFormat | None = None,
) -> Storage:
    """The storage of one checkpoint directory: local where the filesystem renames atomically, else object store.

    ```python
    from autockpt.storage import open_storage
    assert open_storage("/tmp/run").atomic_rename and not open_storage("memory://run").atomic_rename
    ```

    With ``local_dir`` the result is a :class:`TieredStorage`: written to ``local_dir``, uploaded to ``url``
    (deduplicated through both tiers when given the ``pack_format``: see :class:`PackFormat`).
    """
    if local_dir is not None:
        return TieredStorage(open_storage(local_dir), open_storage(url, storage_options), local_max_to_keep,
                             pack_format)
    url = os.fspath(url)
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/") or "/"
    # Capability, not protocol name: an OS-backed filesystem renames a directory atomically.
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(url, root, fs)
    return ObjectStoreStorage(url, root, fs)


__all__ = [
    "BLOBS_DIR", "MANIFEST_NAME", "MAX_MANIFEST_BYTES", "RETRIES", "STEP_RE", "TMP_RE", "BlobStore",
    "CheckpointWriter", "Fence", "Listing", "LocalStorage", "ObjectStoreStorage", "PackFormat", "PayloadFile",
    "Storage", "TieredStorage", "access_problem", "open_storage", "retry", "step_dirname", "transient",
    "valid_file_name",
]

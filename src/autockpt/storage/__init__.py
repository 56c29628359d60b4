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

One job: open the right storage for a URL. Imports ``autockpt.errors`` and the package's own modules
(``base``, ``blobs``, ``local``, ``names``, ``objectstore``, ``retry``, ``tiered``).
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

# A stalled request must fail and be retried, not hang: every S3 request gets a connect and a read timeout
# (the read timeout bounds each wait for bytes of an answer, not a whole transfer; both as s3fs sets them today,
# made explicit), and botocore tries it twice, since s3fs (5 tries) and autockpt (storage.retry: 5 tries; the
# uploader: again later) retry around it. Without the cap a stalled request holds one call for 15 s x 5 botocore
# tries x 5 s3fs tries, over 6 minutes, longer than every cloud's preemption notice (30 s on GCP and Azure,
# 2 min on AWS) and than upload_deadline_s (20 s); with it 2.5 minutes.
S3_REQUEST_DEFAULTS: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts": 2}}


def s3_request_defaults(url: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with :data:`S3_REQUEST_DEFAULTS` added to its ``config_kwargs`` for an S3 URL, each
    one only where the caller did not set it; other URLs: unchanged.

    ```python
    from autockpt.storage import s3_request_defaults
    opts = s3_request_defaults("s3://bucket/run", {"config_kwargs": {"read_timeout": 60}})
    assert opts["config_kwargs"] == {"read_timeout": 60, "connect_timeout": 5, "retries": {"total_max_attempts": 2}}
    assert s3_request_defaults("/tmp/run", None) == {}
    ```
    """
    opts = dict(storage_options or {})
    if fsspec.core.split_protocol(os.fspath(url))[0] in ("s3", "s3a"):
        opts["config_kwargs"] = {**S3_REQUEST_DEFAULTS, **(opts.get("config_kwargs") or {})}
    return opts


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
    On S3, requests get the timeouts of :data:`S3_REQUEST_DEFAULTS` unless ``storage_options`` sets them.
    """
    if local_dir is not None:
        return TieredStorage(open_storage(local_dir), open_storage(url, storage_options), local_max_to_keep,
                             pack_format)
    url = os.fspath(url)
    fs, root = fsspec.core.url_to_fs(url, **s3_request_defaults(url, storage_options))
    root = root.rstrip("/") or "/"
    # Capability, not protocol name: an OS-backed filesystem renames a directory atomically.
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(url, root, fs)
    return ObjectStoreStorage(url, root, fs)


__all__ = [
    "BLOBS_DIR", "MANIFEST_NAME", "MAX_MANIFEST_BYTES", "RETRIES", "STEP_RE", "TMP_RE", "BlobStore",
    "CheckpointWriter", "Fence", "Listing", "LocalStorage", "ObjectStoreStorage", "PackFormat", "PayloadFile",
    "S3_REQUEST_DEFAULTS", "Storage", "TieredStorage", "access_problem", "open_storage", "retry",
    "s3_request_defaults", "step_dirname", "transient", "valid_file_name",
]

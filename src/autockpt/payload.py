"""Writing tensors into a checkpoint's payload files: split into files of about ``shard_bytes``, written in parallel.

One job: turn tensor entries into safetensors files through a ``CheckpointWriter`` (self-contained) or into
pack files of the ``BlobStore`` (deduplicated: only tensors whose content hash is not already stored are
written) and describe them for the manifest. Imports ``autockpt.format`` and ``autockpt.storage``.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from autockpt.format import CHECKSUM, CONTENT_HASH, TensorEntry, tensor_bytes, write_safetensors
from autockpt.storage import BlobStore, CheckpointWriter, step_dirname

_HASH_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class StoredContent:
    """Where bytes of a given content hash already lie: a pack, and the [begin, end) data offsets there."""

    blob: str
    offsets: tuple[int, int]
    pack_size: int


def _shards(entries: list[TensorEntry], shard_bytes: int) -> list[list[TensorEntry]]:
    """Split tensors into files of about ``shard_bytes`` each (largest first into the emptiest file)."""
    total = sum(e.nbytes for e in entries)
    n = max(1, min(len(entries), math.ceil(total / shard_bytes)))
    groups: list[list[TensorEntry]] = [[] for _ in range(n)]
    loads = [0] * n
    for e in sorted(entries, key=lambda e: -e.nbytes):
        i = loads.index(min(loads))
        groups[i].append(e)
        loads[i] += e.nbytes
    return groups


def write_payload(
    writer: CheckpointWriter,
    entries: list[TensorEntry],
    shard_bytes: int,
    prefix: str = "tensors",
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Write tensors into one or more safetensors files, in parallel; returns (files, tensors) manifest parts."""
    groups = _shards(entries, shard_bytes)
    names = [f"{prefix}.safetensors"] if len(groups) == 1 else [
        f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
    ]

    def write_one(name: str, group: list[TensorEntry]) -> tuple[int, str, dict[str, list[int]]]:
        return writer.write_file(name, lambda f: write_safetensors(f, group, on_bytes))

    if len(groups) == 1:
        results = [write_one(names[0], groups[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(len(groups), 4), thread_name_prefix="autockpt-write") as pool:
            results = list(pool.map(write_one, names, groups))
    files: dict[str, dict[str, Any]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for name, group, (size, digest, offsets) in zip(names, groups, results, strict=True):
        files[name] = {"size": size, CHECKSUM: digest}
        for e in group:
            tensors[e.name] = {"file": name, "dtype": e.dtype, "shape": e.shape, "offsets": offsets[e.name],
                               "framework": e.framework}
    return files, tensors


def write_deduplicated(
    blobs: BlobStore,
    step: int,
    entries: list[TensorEntry],
    known: Mapping[str, StoredContent],
    shard_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], int]:
    """Hash every tensor (xxh3-128), write only content not in ``known`` into new packs; returns the manifest's
    (blobs, tensors) parts and the bytes written. Equal tensors of one save are written once.

    The per-tensor hashes replace the file checksum: the packs are written without a second pass over the bytes.
    """
    where: dict[str, StoredContent] = dict(known)
    new: dict[str, TensorEntry] = {}
    datas = [tensor_bytes(e.value) for e in entries]
    for e, data in zip(entries, datas, strict=True):
        if len(data) != e.nbytes:
            raise ValueError(f"tensor {e.name!r} has {len(data)} bytes, expected {e.nbytes}")
    if sum(e.nbytes for e in entries) >= 2**24 and _HASH_THREADS > 1:  # xxhash releases the GIL: hash in parallel
        with ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="autockpt-hash") as pool:
            hashes = list(pool.map(xxhash.xxh3_128_hexdigest, datas))
    else:
        hashes = [xxhash.xxh3_128_hexdigest(d) for d in datas]
    for e, data, digest in zip(entries, datas, hashes, strict=True):
        stored = where.get(digest)
        if (stored is None or stored.offsets[1] - stored.offsets[0] != e.nbytes) and digest not in new:
            # the host bytes just hashed are the bytes written (no second device copy, no change in between)
            new[digest] = TensorEntry(digest, np.frombuffer(data, dtype=np.uint8), "numpy", e.dtype, e.shape)
    written = 0
    if new:
        groups = _shards(list(new.values()), shard_bytes)
        token = secrets.token_hex(6)
        names = [f"{step_dirname(step)}-{token}-{i + 1:03d}.safetensors" for i in range(len(groups))]

        def write_one(name: str, group: list[TensorEntry]) -> tuple[int, str, dict[str, list[int]]]:
            return blobs.write(name, lambda f: write_safetensors(f, group, on_bytes, checksum=False))

        if len(groups) == 1:
            results = [write_one(names[0], groups[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(groups), 4), thread_name_prefix="autockpt-write") as pool:
                results = list(pool.map(write_one, names, groups))
        for name, (size, _, offsets) in zip(names, results, strict=True):
            written += size
            for digest, (b, end) in offsets.items():
                where[digest] = StoredContent(name, (b, end), size)
    blob_part: dict[str, dict[str, Any]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for e, digest in zip(entries, hashes, strict=True):
        stored = where[digest]
        blob_part[stored.blob] = {"size": stored.pack_size}
        tensors[e.name] = {"blob": stored.blob, "offsets": list(stored.offsets), CONTENT_HASH: digest,
                           "dtype": e.dtype, "shape": e.shape, "framework": e.framework}
    return blob_part, tensors, written

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

import xxhash

from autockpt.format import CHECKSUM, CONTENT_HASH, TensorEntry, tensor_bytes, write_safetensors
from autockpt.format.tree import paused_gc
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


@paused_gc()
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


@paused_gc()
def write_deduplicated(
    blobs: BlobStore,
    step: int,
    entries: list[TensorEntry],
    known: Mapping[str, StoredContent],
    shard_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
    changing: frozenset[str] = frozenset(),
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], int, dict[str, str]]:
    """Write only the tensors whose content (xxh3-128) is not in ``known``, into new packs; returns the manifest's
    (blobs, tensors) parts, the bytes written and each tensor's content hash (name -> hex).

    Tensors are hashed before writing, to decide, except those named in ``changing`` (they changed at the
    previous save: dense training) and every tensor when nothing is known: those are written at once and hashed
    as they are written, in one pass over their bytes, as a self-contained save checksums its files. A tensor
    of ``changing`` that turns out not to have changed is written anyway (and referred to where it was written).
    Equal tensors hashed before writing are written once per save. Pack tensors keep the name they had in the
    save that wrote them; the manifest finds them by byte offsets and checks them by hash.
    """
    datas = {e.name: tensor_bytes(e.value) for e in entries}
    for e in entries:
        if len(datas[e.name]) != e.nbytes:
            raise ValueError(f"tensor {e.name!r} has {len(datas[e.name])} bytes, expected {e.nbytes}")
    direct = [e for e in entries if not known or e.name in changing]
    decide = [e for e in entries if known and e.name not in changing]
    todo = [datas[e.name] for e in decide]
    if sum(len(d) for d in todo) >= 2**24 and _HASH_THREADS > 1:  # xxhash releases the GIL: hash in parallel
        with ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="autockpt-hash") as pool:
            hashes = dict(zip([e.name for e in decide], pool.map(xxhash.xxh3_128_hexdigest, todo), strict=True))
    else:
        hashes = {e.name: xxhash.xxh3_128_hexdigest(d) for e, d in zip(decide, todo, strict=True)}
    # the host bytes hashed are the bytes written (``datas``: no second device copy, no change in between)
    to_write = list(direct)
    first_of: dict[str, str] = {}  # content hash -> the tensor of this save that writes it
    for e in decide:
        digest = hashes[e.name]
        stored = known.get(digest)
        if (stored is None or stored.offsets[1] - stored.offsets[0] != e.nbytes) and digest not in first_of:
            first_of[digest] = e.name
            to_write.append(e)
    placed: dict[str, StoredContent] = {}  # tensor name -> where this save wrote it
    written = 0
    if to_write:
        groups = _shards(to_write, shard_bytes)
        token = secrets.token_hex(6)
        names = [f"{step_dirname(step)}-{token}-{i + 1:03d}.safetensors" for i in range(len(groups))]
        inline: list[dict[str, str]] = [{} for _ in groups]

        def write_one(i: int) -> tuple[int, str, dict[str, list[int]]]:
            return blobs.write(names[i], lambda f: write_safetensors(f, groups[i], on_bytes, checksum=False,
                                                                     content_hashes=inline[i], datas=datas))

        if len(groups) == 1:
            results = [write_one(0)]
        else:
            with ThreadPoolExecutor(max_workers=min(len(groups), 4), thread_name_prefix="autockpt-write") as pool:
                results = list(pool.map(write_one, range(len(groups))))
        for name, got, (size, _, offsets) in zip(names, inline, results, strict=True):
            written += size
            for tname, (b, end) in offsets.items():
                placed[tname] = StoredContent(name, (b, end), size)
                hashes.setdefault(tname, got[tname])
    blob_part: dict[str, dict[str, Any]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for e in entries:
        digest = hashes[e.name]
        stored = placed.get(e.name) or placed.get(first_of.get(digest, "")) or known[digest]
        blob_part[stored.blob] = {"size": stored.pack_size}
        tensors[e.name] = {"blob": stored.blob, "offsets": list(stored.offsets), CONTENT_HASH: digest,
                           "dtype": e.dtype, "shape": e.shape, "framework": e.framework}
    return blob_part, tensors, written, hashes

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
from typing import Any, TypeVar

import numpy as np
import xxhash

from autockpt.format import CHECKSUM, CONTENT_HASH, TensorEntry, is_torch_tensor, tensor_bytes, write_safetensors
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


T = TypeVar("T")


def _each_file(write_one: Callable[[int], T], n: int) -> list[T]:
    """``[write_one(i) for i in range(n)]``, up to 4 files at once."""
    if n == 1:
        return [write_one(0)]
    with ThreadPoolExecutor(max_workers=min(n, 4), thread_name_prefix="autockpt-write") as pool:
        return list(pool.map(write_one, range(n)))


def content_hashes(datas: Mapping[str, memoryview]) -> dict[str, str]:
    """The xxh3-128 (hex) of each tensor's bytes (name -> bytes), several at a time for large states."""
    names, todo = list(datas), list(datas.values())
    if sum(len(d) for d in todo) >= 2**24 and _HASH_THREADS > 1 and len(todo) > 1:  # xxhash releases the GIL
        with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(todo)), thread_name_prefix="autockpt-hash") \
                as pool:
            return dict(zip(names, pool.map(xxhash.xxh3_128_hexdigest, todo), strict=True))
    return {n: xxhash.xxh3_128_hexdigest(d) for n, d in zip(names, todo, strict=True)}


def shared_content(entries: list[TensorEntry], known: Mapping[str, StoredContent],
                   changing: frozenset[str] = frozenset()) -> dict[str, str]:
    """Of the host-memory tensors (not in ``changing``), those whose bytes already lie in a pack: name ->
    content hash, hashed now from the tensors' own memory.

    An async save calls it before its snapshot: these tensors need no staging copy (their bytes are read once,
    to hash them, instead of copied and hashed later), and ``write_deduplicated(hashed=...)`` refers to the
    pack. Only the bytes decide; device tensors are left to the snapshot (hashing them needs a host copy).
    """
    if not known:
        return {}
    datas = {}
    for e in entries:
        if e.name in changing or e.framework == "numpy_scalar":
            continue
        host = is_torch_tensor(e.value) and e.value.device.type == "cpu" or isinstance(e.value, np.ndarray)
        if host:
            datas[e.name] = tensor_bytes(e.value)
            if len(datas[e.name]) != e.nbytes:
                raise ValueError(f"tensor {e.name!r} has {len(datas[e.name])} bytes, expected {e.nbytes}")
    return {n: d for n, d in content_hashes(datas).items()
            if d in known and known[d].offsets[1] - known[d].offsets[0] == len(datas[n])}


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

    def write_one(i: int) -> tuple[int, str, dict[str, list[int]]]:
        return writer.write_file(names[i], lambda f: write_safetensors(f, groups[i], on_bytes))

    results = _each_file(write_one, len(groups))
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
    hashed: Mapping[str, str] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], int, dict[str, str]]:
    """Write only the tensors whose content (xxh3-128) is not in ``known``, into new packs; returns the manifest's
    (blobs, tensors) parts, the bytes written and each tensor's content hash (name -> hex).

    Tensors are hashed before writing, to decide, except those named in ``changing`` (they changed at the
    previous save: dense training) and every tensor when nothing is known: those are written at once and hashed
    as they are written, in one pass over their bytes, as a self-contained save checksums its files. A tensor
    of ``changing`` that turns out not to have changed is written anyway (and referred to where it was written).
    Equal tensors hashed before writing are written once per save. Pack tensors keep the name they had in the
    save that wrote them; the manifest finds them by byte offsets and checks them by hash.

    ``hashed`` (name -> content hash) names tensors hashed earlier, from their own memory, whose content is in
    ``known`` (an async save's snapshot leaves them out: see ``shared_content``); their values are not read.
    """
    hashed = hashed or {}
    for name, digest in hashed.items():  # hashed before the snapshot: their bytes must still lie in a pack
        if digest not in known:
            raise FileNotFoundError(f"the pack holding the bytes of tensor {name!r} went missing during the save")
    datas = {e.name: tensor_bytes(e.value) for e in entries if e.name not in hashed}
    for e in entries:
        if e.name in datas and len(datas[e.name]) != e.nbytes:
            raise ValueError(f"tensor {e.name!r} has {len(datas[e.name])} bytes, expected {e.nbytes}")
    direct = [e for e in entries if e.name not in hashed and (not known or e.name in changing)]
    decide = [e for e in entries if e.name not in hashed and known and e.name not in changing]
    hashes = {**content_hashes({e.name: datas[e.name] for e in decide}), **hashed}
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

        results = _each_file(write_one, len(groups))
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

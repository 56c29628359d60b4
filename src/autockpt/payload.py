"""Writing tensors into a checkpoint's payload files: split into files of about ``shard_bytes``, written in parallel.

One job: turn tensor entries into safetensors files through a ``CheckpointWriter`` and describe them for the
manifest. Imports ``autockpt.format`` and ``autockpt.storage``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from autockpt.format import CHECKSUM, TensorEntry, write_safetensors
from autockpt.storage import CheckpointWriter


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

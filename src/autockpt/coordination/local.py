"""``LocalCoordinator``: one process, whose every decision is its own; it writes and commits everything.

Imports ``autockpt.coordination.base``, ``autockpt.format``, ``autockpt.payload`` and ``autockpt.storage``.

One job: the single-process coordinator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from autockpt.coordination.base import DedupWriter, ManifestBuilder
from autockpt.format import TensorEntry, dump_manifest
from autockpt.payload import write_payload
from autockpt.storage import Storage

T = TypeVar("T")


class LocalCoordinator:
    """One process: every decision is its own, and it writes and commits everything."""

    rank = 0
    world_size = 1

    @property
    def is_writer(self) -> bool:
        return True

    def setup(self, storage: Storage) -> None:
        return None

    def agree_to_save(self, step: int, due: bool) -> bool:
        return due

    def any_rank(self, flag: bool, step: int) -> bool:
        return bool(flag)

    def gather(self, value: T) -> list[T]:
        return [value]

    def broadcast_from_writer(self, value: T) -> T:
        return value

    def run_raising_everywhere(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def join_tiers(self, storage: Storage) -> None:
        return None

    def prepare(self, entries: list[TensorEntry]) -> list[TensorEntry]:
        return entries

    def write(
        self, storage: Storage, step: int, entries: list[TensorEntry], shard_bytes: int, make_manifest: ManifestBuilder,
        on_bytes: Callable[[int], None] | None = None, dedup: DedupWriter | None = None,
    ) -> dict[str, Any]:
        with storage.writer(step) as w:
            if dedup is not None:
                blobs, tensors = dedup(entries)
                manifest = make_manifest({}, tensors, blobs)
            else:
                files, tensors = write_payload(w, entries, shard_bytes, on_bytes=on_bytes)
                manifest = make_manifest(files, tensors)
            w.commit(dump_manifest(manifest))
        return manifest

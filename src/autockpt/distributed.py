"""How the ranks of a multi-process run agree: a ``Coordinator``, and the single-process one that does nothing.

A ``CheckpointManager`` asks :func:`coordinator_for` for its coordinator when it is created. Without an
initialised ``torch.distributed`` process group (the only multi-process runtime supported today) it gets a
:class:`LocalCoordinator`, whose every method is the plain single-process behaviour. With one, it gets
``autockpt.integrations.torch_distributed.TorchCoordinator``, which makes every decision collective: the
save step, whether to save, which checkpoint to restore, and the outcome of each save. This module never
imports torch: it only looks at ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from autockpt.format import TensorEntry, dump_manifest
from autockpt.storage import Storage

T = TypeVar("T")
ManifestBuilder = Callable[[dict[str, dict[str, Any]], dict[str, dict[str, Any]]], dict[str, Any]]


class Coordinator(Protocol):
    """What the manager asks of the ranks of a run. Every method is collective: all ranks call it, in order."""

    rank: int
    world_size: int

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the manifest, commits and prunes (rank 0)."""
        ...

    def setup(self, storage: Storage) -> None:
        """Check that every rank sees the same storage; raise InvalidArgumentError on every rank if not."""
        ...

    def agree_to_save(self, step: int, due: bool) -> bool:
        """All ranks must pass the same ``step``; returns True on every rank if any rank wants to save."""
        ...

    def same(self, value: T) -> T:
        """The writer's ``value``, on every rank."""
        ...

    def run_on_all(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on every rank; if it raises an autockpt error on any rank, raise it on every rank."""
        ...

    def prepare(self, entries: list[TensorEntry]) -> list[TensorEntry]:
        """The tensors this rank writes (replicated ones on the writer only, sharded ones as local shards)."""
        ...

    def write(
        self, storage: Storage, step: int, entries: list[TensorEntry], shard_bytes: int, make_manifest: ManifestBuilder,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Write this rank's tensors and, once every rank succeeded, commit; returns the manifest."""
        ...


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

    def same(self, value: T) -> T:
        return value

    def run_on_all(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def prepare(self, entries: list[TensorEntry]) -> list[TensorEntry]:
        return entries

    def write(
        self, storage: Storage, step: int, entries: list[TensorEntry], shard_bytes: int, make_manifest: ManifestBuilder,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        from autockpt.manager import write_payload

        with storage.writer(step) as w:
            files, tensors = write_payload(w, entries, shard_bytes, on_bytes=on_bytes)
            manifest = make_manifest(files, tensors)
            w.commit(dump_manifest(manifest))
        return manifest


def process_group_initialized() -> bool:
    """Whether the program imported torch and initialised a ``torch.distributed`` process group."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def coordinator_for(storage: Storage, distributed: bool | None = None) -> Coordinator:
    """The coordinator for this process: the torch one under an initialised process group, else the local one.

    ``distributed=False`` asks for the local one even under a process group (a caller that coordinates the
    ranks itself and saves from one rank); ``True`` requires a process group.
    """
    if distributed is False:
        return LocalCoordinator()
    if distributed and not process_group_initialized():
        from autockpt.errors import InvalidArgumentError

        raise InvalidArgumentError("distributed=True, but no torch.distributed process group is initialised; "
                                   "call torch.distributed.init_process_group first (torchrun sets up its env)")
    if process_group_initialized():
        from autockpt.integrations.torch_distributed import TorchCoordinator

        return TorchCoordinator()
    return LocalCoordinator()

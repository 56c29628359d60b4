"""What the manager asks of the ranks of a run: the ``Coordinator`` protocol. Every method is collective.

Imports ``autockpt.format`` and ``autockpt.storage`` (for types).

One job: the protocol every coordinator follows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from autockpt.format import TensorEntry
from autockpt.storage import Storage

T = TypeVar("T")
ManifestBuilder = Callable[..., dict[str, Any]]  # (files, tensors[, blobs]) -> the manifest
# A deduplicated save's writing of one rank's tensors: entries -> the manifest's (blobs, tensors) parts.
DedupWriter = Callable[[list[TensorEntry]], tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]]


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
        """All ranks must pass the same ``step``; returns True on every rank if any rank wants to save. A rank that
        does not arrive within the manager's ``rank_timeout`` makes the others raise ``SaveError`` naming it."""
        ...

    def any_rank(self, flag: bool, step: int) -> bool:
        """True on every rank if ``flag`` is True on any rank, at the boundary after ``step``; a rank that does
        not arrive within the manager's ``rank_timeout`` makes the others raise ``SaveError`` naming it."""
        ...

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        ...

    def broadcast_from_writer(self, value: T) -> T:
        """The writer's ``value``, on every rank."""
        ...

    def run_raising_everywhere(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on every rank; if it raises an autockpt error on any rank, raise it on every rank."""
        ...

    def join_tiers(self, storage: Storage) -> None:
        """With a tiered storage (``local_dir``) under several ranks: share its remote tier between them."""
        ...

    def prepare(self, entries: list[TensorEntry]) -> list[TensorEntry]:
        """The tensors this rank writes (replicated ones on the writer only, sharded ones as local shards)."""
        ...

    def write(
        self, storage: Storage, step: int, entries: list[TensorEntry], shard_bytes: int, make_manifest: ManifestBuilder,
        on_bytes: Callable[[int], None] | None = None, dedup: DedupWriter | None = None,
    ) -> dict[str, Any]:
        """Write this rank's tensors (with ``dedup``: into shared packs, through it) and, once every rank
        succeeded, commit; returns the manifest."""
        ...

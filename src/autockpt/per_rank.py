"""Per-rank state: values every rank of a multi-process run saves and restores for itself.

One job: the ``PerRank`` marker and choosing each rank's part of a checkpoint. Everything in a state that is not
a replicated or sharded tensor but differs between ranks (each rank's random generators, its data position,
anything a user keeps per rank) goes in a :class:`PerRank`: every rank encodes its own value, and the manifest
holds them all in one node ``{"type": "per_rank", "ranks": [rank 0's tree, rank 1's tree, ...]}``.

On restore each rank takes its own entry when the number of processes is the one that saved. On another number,
rank ``r`` takes the entry of saved rank ``r % saved``, and ranks beyond the saved ones call
``derive_for_rank(rank)`` on the objects inside that have it (``autockpt.RNGState`` reseeds its generators from
the restored state and the rank, deterministically), so no two ranks share a random stream. A checkpoint written
before per-rank state existed (one plain value) gives that value to every rank.

Imports ``autockpt.errors`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autockpt.errors import CorruptCheckpointError

NODE = "per_rank"


class PerRank:
    """Marks a value of the state as per-rank: under ``torch.distributed`` every rank saves and restores its own.

    Put it at the top level of the state given to ``CheckpointManager.save``/``restore`` (``autockpt.resume`` does
    it for its RNGs). Without a process group it behaves like the plain value (one rank).

    ```python
    import autockpt, random
    mgr = autockpt.CheckpointManager("/tmp/per_rank_demo", max_to_keep=1)
    mgr.save(0, {"rng": autockpt.PerRank(autockpt.RNGState())}, force=True)   # every rank's RNG
    a = random.random()
    mgr.restore({"rng": autockpt.PerRank(autockpt.RNGState())})               # each rank gets its own back
    assert random.random() == a
    ```
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


def is_node(node: Any) -> bool:
    """Whether a manifest state node holds one value per rank."""
    return isinstance(node, dict) and node.get("type") == NODE


def node(trees: list[Any]) -> dict[str, Any]:
    """The manifest node of every rank's encoded value, in rank order."""
    return {"type": NODE, "ranks": list(trees)}


def unwrap(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state with each :class:`PerRank` replaced by its value."""
    return {k: v.value if isinstance(v, PerRank) else v for k, v in state.items()}


def select(tree: Mapping[str, Any], rank: int, where: str) -> tuple[dict[str, Any], dict[str, int]]:
    """This rank's view of a checkpoint's state tree, and ``{key: number of ranks that saved it}``."""
    out: dict[str, Any] = {}
    saved: dict[str, int] = {}
    for key, value in tree.items():
        if is_node(value):
            ranks = value.get("ranks")
            if not isinstance(ranks, list) or not ranks:
                raise CorruptCheckpointError(f"{where}: per-rank entry {key!r} holds no rank's value")
            saved[key] = len(ranks)
            out[key] = ranks[rank % len(ranks)]
        else:
            out[key] = value
    return out, saved


def derive_new_rank(value: Any, rank: int) -> list[str]:
    """Call ``derive_for_rank(rank)`` on every object in ``value`` that has it; their class names."""
    derive = getattr(value, "derive_for_rank", None)
    if callable(derive):
        derive(rank)
        return [type(value).__name__]
    found: list[str] = []
    if isinstance(value, Mapping):
        for v in value.values():
            found += derive_new_rank(v, rank)
    elif isinstance(value, (list, tuple)):
        for v in value:
            found += derive_new_rank(v, rank)
    return found

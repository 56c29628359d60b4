"""How the ranks of a multi-process run agree: a ``Coordinator``, and the single-process one that does nothing.

A ``CheckpointManager`` asks :func:`coordinator_for` for its coordinator when it is created. Without an
initialised ``torch.distributed`` process group (the only multi-process runtime supported today) it gets a
:class:`LocalCoordinator`, whose every method is the plain single-process behaviour. With one, it gets
``autockpt.coordination.torch_dist.TorchCoordinator``, which makes every decision collective: the
save step, whether to save, which checkpoint to restore, and the outcome of each save. This module never
imports torch: it only looks at ``sys.modules``.

The package: ``base`` (the protocol), ``local`` (one process), ``torch_dist`` (torch.distributed). This module
only chooses; it imports ``autockpt.errors`` and the package's modules (``torch_dist`` only once torch is in use).

One job: choose the coordinator of a run. Imports ``autockpt.errors``, ``autockpt.storage`` (for types)
and the package's own modules: ``base``, ``local`` and ``torch_dist`` (only once torch is in use).
"""

from __future__ import annotations

import sys

from autockpt.coordination.base import Coordinator, ManifestBuilder
from autockpt.coordination.local import LocalCoordinator
from autockpt.errors import InvalidArgumentError
from autockpt.storage import Storage


def process_group_initialized() -> bool:
    """Whether the program imported torch and initialised a ``torch.distributed`` process group."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def coordinator_for(storage: Storage, distributed: bool | None = None, rank_timeout: float = 300.0) -> Coordinator:
    """The coordinator for this process: the torch one under an initialised process group, else the local one.

    ``distributed=False`` asks for the local one even under a process group (a caller that coordinates the
    ranks itself and saves from one rank); ``True`` requires a process group. ``rank_timeout``: the seconds
    a rank waits at ``save`` for the others before raising ``SaveError`` naming the ranks that did not arrive.
    """
    if distributed is False:
        return LocalCoordinator()
    if distributed and not process_group_initialized():
        raise InvalidArgumentError("distributed=True, but no torch.distributed process group is initialised; "
                                   "call torch.distributed.init_process_group first (torchrun sets up its env)")
    if process_group_initialized():
        from autockpt.coordination.torch_dist import TorchCoordinator

        return TorchCoordinator(rank_timeout)
    return LocalCoordinator()


__all__ = ["Coordinator", "LocalCoordinator", "ManifestBuilder", "coordinator_for", "process_group_initialized"]

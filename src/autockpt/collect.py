"""Collecting shared packs no checkpoint refers to: mark-and-sweep from the committed manifests.

One job: decide which packs of ``DIR/blobs/`` are garbage, and delete them. Run only by the writer, under the
writer lease, when no save of its own is in flight (at start, and after each save's prune), so no manifest can
be committed while it runs. The order makes every interruption safe:

1. list the packs (a pack written later is not listed, so never deleted);
2. mark: read every committed manifest; if one cannot be read, sweep nothing (it might refer to any pack);
3. sweep: delete the listed packs no manifest refers to, and temporary packs of interrupted writes.

A SIGKILL anywhere leaves only unreferenced packs, which the next collection deletes; a checkpoint is deleted
manifest first, so a referenced pack is never deleted before the manifest that refers to it. A pack written
by a save whose manifest never committed is garbage once that save is over, and goes at the next collection.

Imports ``autockpt.errors``, ``autockpt.format``, ``autockpt.reader`` and ``autockpt.storage``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from autockpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from autockpt.format import parse_safetensors_header
from autockpt.reader import read_manifest
from autockpt.storage import BLOBS_DIR, BlobStore, PackFormat, Storage, step_dirname

log = logging.getLogger("autockpt")


def referenced_packs(manifests: list[dict[str, Any]]) -> set[str]:
    """The packs the given manifests refer to."""
    return {name for m in manifests for name in m.get("blobs", {})}


def collect(storage: Storage, manifest: Callable[[int], dict[str, Any]] | None = None) -> int:
    """Delete the packs no committed checkpoint refers to; returns the bytes freed (0 if marking failed).

    ``manifest(step)`` reads a committed manifest (the manager passes its cache); by default it is read.

    ```python
    import torch, autockpt
    from autockpt.collect import collect
    from autockpt.storage import open_storage
    with autockpt.CheckpointManager("memory://collect_demo", max_to_keep=1) as mgr:
        mgr.save(1, {"w": torch.zeros(4)}); mgr.save(2, {"w": torch.ones(4)})
    assert collect(open_storage("memory://collect_demo")) == 0  # the prune after step 2 collected already
    ```
    """
    if storage.pack_storage is not storage:  # a tiered storage: each tier from its own manifests (the remote's
        return collect(storage.pack_storage)  # by the uploader)
    blobs = BlobStore(storage)
    packs = blobs.packs()  # 1. before marking: a pack that appears later is not ours to judge
    leftovers = blobs.leftovers()
    if not packs and not leftovers:
        return 0
    read = manifest or (lambda s: read_manifest(storage, s))
    manifests = []
    for step in sorted(storage.scan().committed):  # 2. mark
        try:
            manifests.append(read(step))
        except CheckpointNotFoundError:
            continue  # deleted meanwhile: refers to nothing any more
        except (CorruptCheckpointError, OSError) as e:
            log.warning("autockpt: not collecting unreferenced packs of %s: %s cannot be read (%s)",
                        storage.url, step_dirname(step), e)
            return 0
    live = referenced_packs(manifests)
    freed = 0
    storage.guard()  # a writer whose lease ran out (paused past it, replaced) asks the storage, and sweeps nothing
    for name in leftovers:  # 3. sweep (each delete asks the fence again)
        blobs.remove(name)
    for name, size in packs.items():
        if name not in live:
            blobs.remove(name)
            freed += size
            log.debug("autockpt: collected unreferenced pack %s/%s (%d bytes)", BLOBS_DIR, name, size)
    if freed:
        log.info("autockpt: collected %.1f MB of packs no checkpoint refers to in %s", freed / 1e6, storage.url)
    return freed


class _PackFormat:
    """The checkpoint format as the tiered storage's uploader needs it (see ``autockpt.storage.PackFormat``)."""

    def read_manifest(self, storage: Storage, step: int) -> dict[str, Any]:
        return read_manifest(storage, step)

    def data_start(self, read: Callable[[int, int], bytes], size: int, where: str) -> int:
        return parse_safetensors_header(read, size, where)[0]

    def collect(self, storage: Storage, manifest: Callable[[int], dict[str, Any]]) -> int:
        return collect(storage, manifest)


PACK_FORMAT: PackFormat = _PackFormat()

"""``TorchCoordinator``: the ranks of a ``torch.distributed`` process group agreeing through collectives.

One job: make the manager's decisions and the save protocol collective (see the user documentation in
``autockpt.integrations.torch_distributed``). Imports torch, ``autockpt.coordination.base``, ``autockpt.dtensor``,
``autockpt.errors``, ``autockpt.format``, ``autockpt.payload``, ``autockpt.reader`` and ``autockpt.storage``.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from autockpt.coordination.base import DedupWriter, ManifestBuilder
from autockpt.dtensor import DTensor, is_sharded, local_box
from autockpt.errors import AutockptError, InvalidArgumentError, SaveError, UnsupportedValueError, failed_on_ranks
from autockpt.format import TensorEntry, dump_manifest
from autockpt.payload import write_payload
from autockpt.reader import read_manifest
from autockpt.storage import CheckpointWriter, Storage, TieredStorage, step_dirname
from autockpt.storage.tiered import TierGroup

log = logging.getLogger("autockpt")
T = TypeVar("T")
_DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (an all-reduce); just ``flag`` without a process group.

    Call it on every rank at the same point of each step, e.g. with ``PreemptionWatcher().triggered``, so
    that a signal seen by one rank stops all of them at the same step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":  # pragma: no cover - needs GPUs
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _timeout() -> datetime.timedelta:
    """The default process group's timeout (set by ``init_process_group(timeout=...)``), else 10 minutes."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        t = pg._get_backend(torch.device("cpu")).options._timeout
        return t if isinstance(t, datetime.timedelta) else _DEFAULT_TIMEOUT
    except Exception:
        return _DEFAULT_TIMEOUT


@dataclass
class ShardEntry(TensorEntry):
    """This rank's shard of a sharded tensor: ``shape`` is the shard's, ``global_shape`` the whole tensor's."""

    shard_of: str = ""
    global_shape: list[int] = field(default_factory=list)
    shard_offsets: list[int] = field(default_factory=list)


class TorchCoordinator:
    """The ranks of a ``torch.distributed`` process group agreeing through collectives.

    It creates two gloo process groups of its own (so it never interleaves with the training's collectives,
    and works beside NCCL): one for decisions taken in the calling thread, one for the save protocol, which
    may run in the background thread of ``async_save``. Both use the default group's timeout, so a rank that
    died or never arrives makes the others raise after that timeout instead of hanging.

    Before the decisions taken at a step (``agree_to_save``, ``any_rank``) every rank first checks in through
    the process group's store and waits at most ``rank_timeout`` seconds for the others: a rank that never
    reaches ``save`` (a bug, a hang, a crash) makes the others raise ``SaveError`` whose ``failures`` name
    the missing ranks, instead of a bare ``RuntimeError`` after the process group's timeout.
    """

    def __init__(self, rank_timeout: float = 300.0) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.rank_timeout = float(rank_timeout)
        timeout = _timeout()
        self._ctl = dist.new_group(backend="gloo", timeout=timeout)
        self._io = dist.new_group(backend="gloo", timeout=timeout)
        token = self._bcast(secrets.token_hex(8) if self.rank == 0 else None, self._ctl)
        self._store = dist.PrefixStore(f"autockpt-{token}/", dist.distributed_c10d._get_default_store())
        self._round = 0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ primitives
    def _gather(self, value: Any, group: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=group)
        return out

    def _bcast(self, value: Any, group: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def broadcast_from_writer(self, value: T) -> T:
        return self._bcast(value if self.rank == 0 else None, self._ctl)

    def run_raising_everywhere(self, fn: Callable[..., T], *args: Any) -> T:
        result: Any = None
        err: Exception | None = None
        try:
            result = fn(*args)
        except AutockptError as e:
            err = e
        reports = self._gather(err, self._ctl)  # each rank's error (with its class and fields), or None
        failed = {r: rep for r, rep in enumerate(reports) if rep is not None}
        if not failed:
            return result
        if hasattr(result, "close"):
            result.close()
        if err is not None:
            raise err
        raise failed_on_ranks(failed)

    def _arrive(self, what: str) -> None:
        """Check in and wait (at most ``rank_timeout``) until every rank did; else raise naming the missing."""
        self._round += 1
        key = f"{self._round}/"
        store = self._store
        store.set(key + str(self.rank), "1")
        try:
            store.wait([key + str(r) for r in range(self.world_size)],
                       datetime.timedelta(seconds=self.rank_timeout))
        except Exception as e:  # a timeout (DistStoreError), or the store itself is gone (rank 0 died)
            try:
                missing = [r for r in range(self.world_size) if not store.check([key + str(r)])]
            except Exception:
                missing = [0] if self.rank != 0 else []
            if not missing and not isinstance(e, dist.DistStoreError):
                raise
            if missing:
                why = (f"did not reach {what} within rank_timeout={self.rank_timeout:g} s (a hang, a crash or a "
                       "code path that skips it on that rank)")
                error = SaveError(
                    f"{what}: rank(s) {missing} {why}; nothing was saved. Every rank must call save() at the same "
                    "step; raise rank_timeout= of the CheckpointManager (or autockpt.resume) if a rank "
                    "legitimately needs longer (e.g. an evaluation on one rank)")
                error.failures = {r: why for r in missing}
                raise error from None
        if self._round > 1:  # every rank passed the round before: its key is no longer waited for
            try:
                store.delete_key(f"{self._round - 1}/{self.rank}")
            except Exception:  # pragma: no cover - only bookkeeping
                pass

    def gather(self, value: T) -> list[T]:
        return self._gather(value, self._ctl)

    def any_rank(self, flag: bool, step: int) -> bool:
        self._arrive(f"the end of step {step}")
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctl)
        return bool(t.item())

    def agree_to_save(self, step: int, due: bool) -> bool:
        self._arrive(f"save(step={step})")
        t = torch.tensor([step, -step, 1 if due else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctl)
        if int(t[0]) != -int(t[1]):
            raise InvalidArgumentError(
                f"ranks called save() with different steps (from {-int(t[1])} to {int(t[0])}); every rank must "
                "save the same step: decide to stop with autockpt.integrations.torch_distributed.any_rank()"
            )
        return bool(t[2])

    # ------------------------------------------------------------------------------------------ storage check
    def setup(self, storage: Storage) -> None:
        """Rank 0 writes a probe file; every rank must see it, else the storage is not shared."""
        token = self._bcast(secrets.token_hex(8) if self.rank == 0 else None, self._ctl)
        name = f".autockpt-probe-{token}"
        path = storage.path(name)
        problem = None
        if self.rank == 0:
            try:
                storage.ensure_root()
                storage.write_small(name, token.encode())
            except Exception as e:
                problem = f"rank 0 cannot write to {storage.url}: {e!r}"
        problem = self._bcast(problem, self._ctl)
        if problem is not None:
            raise InvalidArgumentError(problem)
        try:
            seen = storage.exists(name)
        except Exception:
            seen = False
        seen_by = self._gather(seen, self._ctl)  # every rank has looked before rank 0 deletes its probe
        if self.rank == 0:
            try:
                storage.remove_small(name)
            except Exception as e:
                log.warning("autockpt: could not remove its probe file %s: %r", path, e)
        blind = [r for r, s in enumerate(seen_by) if not s]
        if blind:
            raise InvalidArgumentError(
                f"the checkpoint directory {storage.url} is not shared between the ranks: ranks {blind} do not see "
                "the file rank 0 wrote there. Every rank must see the same directory: use a shared filesystem "
                "(NFS, Lustre, ...) mounted at the same path, or an object store URL (s3://, gs://, ...)"
            )

    def join_tiers(self, storage: Storage) -> None:
        """With ``local_dir`` (one per node): share the remote tier. The steps every rank committed locally and
        that are not durable yet are the backlog the ranks upload together."""
        mine = sorted(storage.local.scan().committed) if isinstance(storage, TieredStorage) else None
        every = self._gather(mine, self._ctl)
        if all(s is None for s in every):
            return
        if not isinstance(storage, TieredStorage) or any(s is None for s in every):
            raise InvalidArgumentError(
                f"local_dir is given on ranks {[r for r, s in enumerate(every) if s is not None]} only: give every "
                "rank its own local_dir (or none)")
        complete = set.intersection(*(set(s) for s in every if s is not None))
        store = dist.PrefixStore("tiers/", self._store)
        storage.join_group(TierGroup(self.rank, self.world_size, store, self.rank_timeout), complete)

    # ------------------------------------------------------------------------------------------ saving
    def prepare(self, entries: list[TensorEntry]) -> list[TensorEntry]:
        """The tensors this rank writes: replicated ones on rank 0 only, and this rank's shards."""
        out: list[TensorEntry] = []
        for e in entries:
            v = e.value
            if DTensor is not None and isinstance(v, DTensor):
                if any(p.is_partial() for p in v.placements):
                    raise UnsupportedValueError(
                        f"DTensor {e.name!r} has a Partial placement (a pending reduction); reduce it "
                        "(redistribute to Shard or Replicate) before saving"
                    )
                coord = v.device_mesh.get_coordinate()
                if coord is None:  # this rank is not in the tensor's mesh
                    continue
                if not is_sharded(v):
                    if self.rank == 0:
                        out.append(replace(e, value=v.to_local()))
                    continue
                # Several ranks hold the same shard when a mesh dimension replicates: the first of them writes.
                if any(p.is_replicate() and c != 0 for p, c in zip(v.placements, coord, strict=True)):
                    continue
                shape, offsets = local_box(v)
                local = v.to_local()
                if list(local.shape) != shape:
                    if not all(a >= b for a, b in zip(local.shape, shape, strict=True)):
                        raise UnsupportedValueError(f"DTensor {e.name!r}: local shard {list(local.shape)} does not "
                                                    f"hold the expected {shape}")
                    local = local[tuple(slice(0, s) for s in shape)]  # a padded shard
                if local.numel() == 0:
                    continue
                out.append(ShardEntry(
                    f"{e.name}::shard@{'_'.join(map(str, offsets))}", local, "torch", e.dtype, shape,
                    shard_of=e.name, global_shape=list(e.shape), shard_offsets=offsets,
                ))
            elif self.rank == 0:
                out.append(e)
        return out

    def _write_mine(self, storage: Storage, directory: str, entries: list[TensorEntry], shard_bytes: int,
                    on_bytes: Callable[[int], None] | None = None, dedup: DedupWriter | None = None,
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """This rank's (files, tensors, blobs) manifest parts; with ``dedup`` its tensors go into shared packs
        (each rank deduplicates its own shards against the kept checkpoints) and ``files`` is empty."""
        if not entries:
            return {}, {}, {}
        blobs: dict[str, Any] = {}
        if dedup is not None:
            files: dict[str, Any] = {}
            blobs, tensors = dedup(entries)
        else:
            files, tensors = write_payload(CheckpointWriter.attach(storage, directory), entries,
                                           shard_bytes, prefix=f"rank-{self.rank:05d}", on_bytes=on_bytes)
        for e in entries:
            if isinstance(e, ShardEntry):
                tensors[e.name].update(shard_of=e.shard_of, global_shape=e.global_shape,
                                       shard_offsets=e.shard_offsets)
        return files, tensors, blobs

    def write(
        self, storage: Storage, step: int, entries: list[TensorEntry], shard_bytes: int, make_manifest: ManifestBuilder,
        on_bytes: Callable[[int], None] | None = None, dedup: DedupWriter | None = None,
    ) -> dict[str, Any]:
        """The save protocol; see the module's docstring and ``docs``: one commit, by rank 0, after all succeeded."""
        if isinstance(storage, TieredStorage) and storage.grouped:
            return self._write_tiered(storage, step, entries, shard_bytes, make_manifest, on_bytes)
        where = f"saving step {step} to {storage.url}"
        writer: CheckpointWriter | None = None
        manifest: dict[str, Any] | None = None
        try:
            # 1. rank 0 creates the checkpoint's directory (a temporary one where rename is atomic).
            start: tuple[str, str]
            if self.rank == 0:
                try:
                    writer = CheckpointWriter(storage, step)
                    start = ("ok", writer.dir)
                except Exception as e:
                    start = ("error", repr(e))
            else:
                start = ("", "")
            start = self._bcast(start, self._io)
            if start[0] != "ok":
                raise SaveError(f"{where} failed: rank 0 could not create the checkpoint directory: {start[1]}")
            # 2. every rank writes its files; 3. every rank reports its files and checksums, or its error.
            try:
                report: Any = ("ok", self._write_mine(storage, start[1], entries, shard_bytes, on_bytes, dedup))
            except Exception as e:
                log.error("autockpt: rank %d failed writing step %d: %r", self.rank, step, e)
                report = ("error", f"{type(e).__name__}: {e}")
            reports = self._gather(report, self._io)
            # 4. rank 0 commits only if every rank succeeded.
            outcome: dict[int, str] | None = None
            if self.rank == 0:
                assert writer is not None
                failed = {r: rep[1] for r, rep in enumerate(reports) if rep[0] != "ok"}
                if failed:
                    outcome = failed
                    writer.abort()
                else:
                    try:
                        files: dict[str, Any] = {}
                        tensors: dict[str, Any] = {}
                        blobs: dict[str, Any] = {}
                        for _, (f, t, b) in reports:
                            files.update(f)
                            tensors.update(t)
                            blobs.update(b)
                        manifest = (make_manifest(files, tensors, blobs) if dedup is not None
                                    else make_manifest(files, tensors))
                        writer.commit(dump_manifest(manifest))
                    except Exception as e:
                        outcome = {0: f"could not commit: {e!r}"}
                        writer.abort()
            # 5. everyone learns the outcome.
            outcome = self._bcast(outcome, self._io)
        except SaveError:
            raise
        except Exception as e:  # a collective failed: a rank died or timed out
            if writer is not None and not writer.committed:
                writer.abort()
            raise SaveError(f"{where} failed: the ranks could not complete the save protocol ({e!r}); nothing "
                            "was committed by this rank; earlier checkpoints are intact") from e
        if outcome is not None:  # {rank: what went wrong there}
            shown = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(outcome.items()))
            error = SaveError(f"{where} failed, nothing was committed: {shown}. Earlier checkpoints are intact.")
            error.failures = dict(outcome)
            raise error
        if manifest is None:  # other ranks: the manifest rank 0 committed, for logging and the manifest cache
            manifest = self._manifest_of(storage, step)
        return manifest

    def _write_tiered(
        self, storage: TieredStorage, step: int, entries: list[TensorEntry], shard_bytes: int,
        make_manifest: ManifestBuilder, on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """The save protocol with node-local dirs: every rank writes its files into its own local dir; rank 0
        makes the manifest of all of them; every rank commits it locally (next to its own files only); once all
        did, each rank queues its upload (see ``TieredStorage``). Any rank's failure fails the save everywhere
        and removes the local copies that were committed."""
        where = f"saving step {step} to {storage.local.url} (rank {self.rank})"
        writer: CheckpointWriter | None = None
        try:
            try:
                writer = CheckpointWriter(storage, step)
                report: Any = ("ok", self._write_mine(storage, writer.dir, entries, shard_bytes, on_bytes))
            except Exception as e:
                log.error("autockpt: rank %d failed writing step %d: %r", self.rank, step, e)
                report = ("error", f"{type(e).__name__}: {e}")
            reports = self._gather(report, self._io)
            failed = {r: rep[1] for r, rep in enumerate(reports) if rep[0] != "ok"}
            raw: bytes | None = None
            if self.rank == 0 and not failed:
                try:
                    files: dict[str, Any] = {}
                    tensors: dict[str, Any] = {}
                    for _, (f, t, _blobs) in reports:  # no packs here: the tiers upload each rank's files
                        files.update(f)
                        tensors.update(t)
                    raw = dump_manifest(make_manifest(files, tensors))
                except Exception as e:
                    failed = {0: f"could not make the manifest: {e!r}"}
            raw, failed = self._bcast((raw, failed), self._io)
            if not failed:  # (every rank has rank 0's ``failed``: all of them skip this, or none)
                assert writer is not None and raw is not None
                committed = None
                try:
                    writer.commit(raw)
                except Exception as e:
                    committed = f"could not commit locally: {e!r}"
                failed = {r: msg for r, msg in enumerate(self._gather(committed, self._io)) if msg is not None}
        except Exception as e:  # a collective failed: a rank died or timed out
            failed = {-1: f"the ranks could not complete the save protocol ({e!r})"}
        if failed:
            if writer is not None:
                if writer.committed:  # not committed on every rank: not a checkpoint
                    storage.local.delete(step)
                else:
                    writer.abort()
            shown = "; ".join(f"rank {r}: {msg}" if r >= 0 else msg for r, msg in sorted(failed.items()))
            error = SaveError(f"{where} failed, nothing was committed: {shown}. Earlier checkpoints are intact.")
            error.failures = {r: m for r, m in failed.items() if r >= 0}
            raise error
        storage.queue_upload(step)
        return self._manifest_of(storage, step)

    def _manifest_of(self, storage: Storage, step: int) -> dict[str, Any]:
        try:
            return read_manifest(storage, step)
        except Exception as e:
            raise SaveError(f"step {step} was committed by rank 0 but {storage.path(step_dirname(step))} cannot be "
                            f"read from rank {self.rank}: {e!r}") from e

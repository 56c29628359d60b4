"""``CheckpointManager``: when to save, what to keep, and restoring the newest checkpoint that verifies.

One job: the manager's decisions (when to save, the failure policy, what to keep, which checkpoint to
restore); the mechanics live below it. Imports the layers below: options, coordination, lease, retention,
staging, fit, progress, collect, per_rank, payload, reader, format, storage, errors.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar

import numpy as np

from autockpt import fit, per_rank
from autockpt.collect import PACK_FORMAT, collect
from autockpt.coordination import coordinator_for
from autockpt.errors import (
    AutockptError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    LeaseError,
    SaveError,
    StorageAccessError,
)
from autockpt.format import (
    CHECKSUM,
    CONTENT_HASH,
    TensorEntry,
    TreeEncoder,
    json_plain,
    new_manifest,
    paused_gc,
)
from autockpt.lease import LEASE_NAME, WriterLease
from autockpt.options import ManagerOptions, check_directory
from autockpt.payload import StoredContent, shared_content, write_deduplicated
from autockpt.per_rank import PerRank
from autockpt.progress import ProgressReporter
from autockpt.reader import (
    Checkpoint,
    check_sizes,
    newest_that_verifies,
    open_checkpoint,
    read_manifest,
    referenced_bytes,
)
from autockpt.retention import CheckpointInfo, KeepBest
from autockpt.staging import BackgroundSaver
from autockpt.storage import (
    BlobStore,
    Storage,
    access_problem,
    open_storage,
    step_dirname,
    transient,
)

log = logging.getLogger("autockpt")
T = TypeVar("T")


class CheckpointManager:
    """Saves, keeps and restores the checkpoints of one training run in one directory (any fsspec URL).

    Args:
        directory: a local path or an fsspec URL (``memory://run``, ``s3://bucket/prefix``, ``gs://...``).
        max_to_keep: how many of the newest checkpoints to keep; ``None`` keeps all.
        keep_every_n_hours: additionally keep one checkpoint per N hours of the run, forever.
        keep_best: additionally keep the best checkpoints by a metric: ``autockpt.KeepBest("val_loss")``.
        save_interval_steps: ``save(step, ..., force=False)`` only writes when ``step`` is a multiple of it.
        save_interval_seconds: ... or when this many seconds passed since the last save.
        async_save: ``save()`` returns once the tensors are copied to host memory; a background thread writes
            and commits. One save is in flight at a time: a new ``save()`` waits for the previous one. A
            background failure is logged at once and raised by the next ``save()``, ``wait_until_finished()``
            or ``close()``.
        storage_options: passed to fsspec (credentials, endpoint URL, ...).
        max_consecutive_failures: a save that fails (disk full, storage unreachable after retries) logs a
            warning, removes its partial files and returns False, so training goes on; the N-th failure in a
            row raises ``SaveError``. ``1`` raises at the first failure.
        progress: show bytes and rate on the terminal while large checkpoints (64 MiB and more) are saved
            and restored. Either way one summary line per save and restore is logged to the "autockpt"
            logger at INFO level.
        rank_timeout: under ``torch.distributed``, the seconds each rank waits at ``save`` (and at
            ``autockpt.resume``'s step boundary) for the other ranks; a rank that does not arrive in time (a hang,
            a crash, a code path that skips ``save``) makes the others raise ``SaveError`` whose ``failures``
            name the missing ranks, instead of waiting for the process group's timeout.
        distributed: ``None`` (default) detects an initialised ``torch.distributed`` process group; then the
            manager is collective: create it and call ``save``/``restore``/``latest_step`` on every rank.
            ``False`` keeps it local to this process even under a process group (for code that saves from
            one rank and coordinates the ranks itself).
        local_dir: a fast local directory (node-local NVMe) in front of ``directory``: ``save()`` commits
            there at local speed and a background thread uploads each checkpoint to ``directory``, the durable
            tier and the one retention is computed on. ``durable_step`` is the newest uploaded step. Restore
            reads the local copy when it verifies, else the remote one. Under ``torch.distributed`` each rank
            gives its own node-local dir (only ``directory`` must be shared): each rank uploads its own files and
            rank 0 commits the remote manifest once every rank's upload verified. See README "Preemptible machines".
        local_max_to_keep: how many of the newest checkpoints stay in ``local_dir``; steps not yet uploaded
            stay too (until uploaded or pruned by the retention policy).
        upload_deadline_s: on preemption, how long to wait for the final checkpoint to become durable. 20 s
            fits the shortest common notice: GCP and Azure spot VMs and a Kubernetes pod's default grace
            period give 30 s after SIGTERM (AWS spot gives 120 s), leaving time for the local save and exit.
        lease_ttl: seconds the writer lease lives without renewal (default 30): a writer that stops renewing
            (killed, paused, cut off) is taken over after this long; a paused writer that wakes up later
            commits and deletes nothing.
        lease_renew_seconds: how often the lease is renewed in the background; ``None``: ``lease_ttl / 3``.
        dedup: a tensor whose bytes equal a tensor of a kept checkpoint is not written again (xxh3-128 content
            hash); new tensors go into pack files under ``DIR/blobs/``, shared by the checkpoints that refer to
            them, and packs no checkpoint refers to any more are collected after each prune. ``False`` writes
            self-contained checkpoint directories. Under torch.distributed each rank deduplicates its own
            shards; with ``local_dir`` packs are written locally and only those the remote lacks are uploaded.

    Only one process writes to a directory at a time: :meth:`acquire` (called by ``autockpt.resume`` and the
    callbacks when training starts, else by the first ``save()``) takes the writer lease, renewed by a
    heartbeat and released by ``close()``; a second live writer gets ``LeaseError``, as does a writer that lost
    the lease, before it commits or deletes anything. Reading never needs it. A directory that cannot be
    written (read-only, a file, no credentials) raises ``StorageAccessError`` there. Transient errors of
    remote storage are retried with bounded backoff.

    A step is the number of completed optimizer updates; the checkpoint of step N holds the state after N
    updates. The state is a mapping of names to objects with ``state_dict()``/``load_state_dict()`` (torch
    modules, optimizers, schedulers, ``autockpt.RNGState()``), tensors, numpy arrays and plain values.
    Under ``torch.distributed`` a top-level value wrapped in ``autockpt.PerRank`` is saved by every rank and
    restored into the same rank: ``state = {"model": model, "rng": autockpt.PerRank(autockpt.RNGState())}``.

    ```python
    import torch, autockpt
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    with autockpt.CheckpointManager("/tmp/ckpt_demo", max_to_keep=3) as mgr:
        start = mgr.restore({"model": model, "opt": opt}) or 0
        for step in range(start + 1, start + 11):
            opt.zero_grad(); model(torch.randn(8, 4)).sum().backward(); opt.step()
            mgr.save(step, {"model": model, "opt": opt}, metrics={"loss": 0.1})
    with autockpt.CheckpointManager("memory://tiers_demo/run", local_dir="/tmp/tiers_demo") as mgr:
        mgr.save(1, {"model": model})               # committed locally, uploaded in the background
        assert mgr.wait_until_finished(timeout=30) and mgr.durable_step == 1
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 5,
        keep_every_n_hours: float | None = None,
        keep_best: KeepBest | None = None,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        max_consecutive_failures: int = 3,
        progress: bool = False,
        distributed: bool | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        local_max_to_keep: int = 2,
        upload_deadline_s: float = 20.0,
        rank_timeout: float = 300.0,
        lease_ttl: float = 30.0,
        lease_renew_seconds: float | None = None,
        dedup: bool = True,
    ) -> None:
        check_directory(directory)
        self.options = ManagerOptions(
            max_to_keep, keep_every_n_hours, keep_best, save_interval_steps, save_interval_seconds, async_save,
            storage_options, max_consecutive_failures, progress, distributed, local_dir, local_max_to_keep,
            upload_deadline_s, rank_timeout, lease_ttl, lease_renew_seconds, dedup,
        )
        self.upload_deadline_s = upload_deadline_s
        self._stopping = False  # durability() was called: the process is about to exit; close() waits no more
        self.policy = self.options.policy
        self.progress = progress
        self.max_consecutive_failures = max_consecutive_failures
        self._failures = 0
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.async_save = async_save
        self.storage = open_storage(directory, dict(storage_options or {}), local_dir, local_max_to_keep,
                                    PACK_FORMAT)
        self.directory = self.storage.url
        self._manifests: dict[int, dict[str, Any]] = {}
        self._verified: set[tuple[Any, ...]] = set()  # identities of checkpoints whose checksums matched once
        self._last_save_time = time.monotonic()
        self.shard_bytes = 512 * 2**20
        self._background = BackgroundSaver()  # async_save: host staging buffers and the writing thread
        self._closed = False
        # Under torch.distributed every rank creates the manager; ranks then agree on every decision.
        self._coord = coordinator_for(self.storage, distributed, rank_timeout)
        self._coord.setup(self.storage)  # with local_dir: the remote tier must be shared, not the local dirs
        self._coord.join_tiers(self.storage)  # ... which each rank uploads its own files to
        self._tiers_shared = self.storage.grouped
        self._lease = WriterLease(self.storage, lease_ttl, lease_renew_seconds)  # held by the writing rank only
        # Under torch.distributed each rank deduplicates its own tensors (its shards) into packs of its own.
        # Not with multi-rank tiers: each rank uploads its own step files, not packs (a later step).
        self.dedup = dedup and self.storage.holds_shared_packs and not self._tiers_shared
        self._blobs = BlobStore(self.storage)
        self._hashes: dict[str, str] = {}  # tensor name -> content hash at the previous save (dedup)
        self._changing: set[str] = set()  # tensors whose content changed at the previous save
        try:
            if self.storage.root_is_file():
                raise StorageAccessError(f"{self.directory} is a file, not a directory: give the path of a "
                                         "directory for the checkpoints (it is created if missing)")
            if self._coord.is_writer:
                self._clean_at_start()
        except Exception as e:
            why = access_problem(e)  # no credentials, say: not retried, not found out three saves later
            if why is None:
                raise
            raise StorageAccessError(f"cannot use {self.directory}: {why}") from None
        if self.storage.grouped:
            self._coord.gather(None)  # the writer cleaned up the remote before the ranks resume their uploads
            self.storage.resume_uploads()

    # ------------------------------------------------------------------------------------------ the lease
    def acquire(self) -> None:
        """Become the directory's one writer now: take the lease (collective: call it on every rank).

        Raises ``LeaseError`` if another live process writes there, ``StorageAccessError`` if the directory
        cannot be written (read-only, a file, no credentials), on every rank. Leftovers of an interrupted save
        are removed once the lease is ours. ``save()`` calls it when needed; call it first to fail before
        restoring and training. Idempotent.

        ```python
        import autockpt
        mgr = autockpt.CheckpointManager("/tmp/acquire_demo")
        mgr.acquire()  # this process is the writer now
        mgr.close()    # releases the lease
        ```
        """
        if self._closed:
            raise InvalidArgumentError("this CheckpointManager is closed; create a new one to save")
        problem = self._coord.broadcast_from_writer(self._take_lease() if self._coord.is_writer else None)
        if problem is not None:
            raise problem

    # ------------------------------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Steps of every committed checkpoint, oldest first (committed does not mean verified)."""
        return sorted(self.storage.scan().committed)

    def _manifest(self, step: int) -> dict[str, Any]:
        if step not in self._manifests:
            self._manifests[step] = read_manifest(self.storage, step)
        return self._manifests[step]

    def _check_files(self, step: int) -> None:
        self._from_a_copy(step, lambda storage: check_sizes(storage, step, read_manifest(storage, step)))

    def _from_a_copy(self, step: int, use: Callable[[Storage], T]) -> T:
        """``use(copy)`` on the first copy of ``step`` that verifies (a tiered storage has a local and a remote
        one); a damaged copy is skipped with a warning; the last one's error is raised."""
        copies = self.storage.copies(step)
        for i, copy in enumerate(copies):
            try:
                return use(copy)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                if i == len(copies) - 1:
                    raise
                log.warning("autockpt: the copy of %s in %s does not verify (%s); using the one in %s",
                            step_dirname(step), copy.url, e, copies[i + 1].url)
        raise AssertionError("unreachable")

    @property
    def durable_step(self) -> int | None:
        """The newest step committed on the durable tier: ``directory`` (with ``local_dir``, uploaded there)."""
        self._wait()
        return self.storage.durable_step

    @staticmethod
    def _identity(manifest: Mapping[str, Any]) -> tuple[Any, ...]:
        """What names one written checkpoint: its step, creation time and every file's size and checksum."""
        files = tuple(sorted((n, f["size"], f.get(CHECKSUM)) for n, f in manifest["files"].items()))
        blobs = tuple(sorted((n, b["size"]) for n, b in manifest.get("blobs", {}).items()))  # shared packs
        tensors = tuple(sorted((n, t.get(CONTENT_HASH)) for n, t in manifest["tensors"].items())) if blobs else ()
        return manifest["step"], manifest["created"], files, blobs, tensors

    def _verify_once(self, step: int) -> None:
        """Sizes on every call; the full checksums only the first time this manager sees this checkpoint."""
        manifest = self._manifest(step)

        def verify(copy: Storage) -> None:  # with local_dir: the local copy, else the remote one
            check_sizes(copy, step, manifest)
            if self._identity(manifest) not in self._verified:
                open_checkpoint(copy, step, manifest).close()  # reads every byte once; raises if damaged
                self._verified.add(self._identity(manifest))

        self._from_a_copy(step, verify)

    @property
    def latest_step(self) -> int | None:
        """The newest committed checkpoint that verifies: its manifest, file sizes and checksums.

        Each checkpoint's checksums are read once per manager (``restore``'s verification counts); later
        calls check the manifest and file sizes only, so a checkpoint damaged in place after that is caught by
        ``restore``, which verifies every checksum again and falls back past a checkpoint that fails.
        """
        self._wait()
        steps = sorted(self._coord.broadcast_from_writer(self.storage.scan().committed), reverse=True)
        found = newest_that_verifies(steps, lambda s: self._coord.run_raising_everywhere(self._verify_once, s))
        return None if found is None else found[0]

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due under ``save_interval_steps``/``save_interval_seconds`` (always, if neither)."""
        if self.save_interval_steps is None and self.save_interval_seconds is None:
            return True
        if self.save_interval_steps is not None and step % self.save_interval_steps == 0:
            return True
        return (
            self.save_interval_seconds is not None
            and time.monotonic() - self._last_save_time >= self.save_interval_seconds
        )

    # ------------------------------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as the checkpoint of ``step``; returns True if a checkpoint was written (or queued).

        Without ``force`` a step that is not due (see ``should_save``) is skipped. A step that already has a
        committed checkpoint is skipped too. Raises ``SaveError`` if writing fails (earlier checkpoints are
        intact and the partial files are removed) and ``UnsupportedValueError`` for values that would need
        pickle.
        """
        if self._closed:
            raise InvalidArgumentError("this CheckpointManager is closed; create a new one to save")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise InvalidArgumentError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise InvalidArgumentError("state must be a mapping with str keys, e.g. {'model': model}")
        if not self._coord.agree_to_save(step, force or self.should_save(step)):
            self._stage_ahead(state)
            return False
        clean_metrics = self._clean_metrics(metrics)
        clean_metadata = json_plain(dict(metadata or {}), "metadata")
        try:
            self._join()
        except SaveError as e:  # the previous background save failed (and was counted when it did)
            self._failed(e, counted=True)
        encoder, mine = TreeEncoder(), TreeEncoder()  # mine: this rank's per-rank values, written by this rank
        with paused_gc():  # a state of 20,000 tensors: the collector's passes would cost as much as the bytes
            tree = {k: None if isinstance(v, PerRank) else encoder.encode(v, (k,)) for k, v in state.items()}
            own = {k: mine.encode(v.value, (k, f"rank-{self._coord.rank:05d}"))  # bad values raise before writing
                   for k, v in state.items() if isinstance(v, PerRank)}
        if own:
            every = self._coord.gather(own)
            for k in own:
                tree[k] = per_rank.node([ranks[k] for ranks in every])
        problem = self._coord.broadcast_from_writer(self._take_lease() if self._coord.is_writer else None)
        if problem is not None:  # every rank learns of it, so that no rank waits for the others
            if isinstance(problem, (LeaseError, StorageAccessError)):
                raise problem
            self._failed(problem)
            return False
        committed = self._coord.broadcast_from_writer(self.storage.scan().committed)
        if step in committed:
            try:
                self._check_files(step)
                already = True
            except CorruptCheckpointError:
                already = False
            if self._coord.broadcast_from_writer(already):
                log.info("autockpt: step %d already has a committed checkpoint; not saving it again", step)
                return False
            self._manifests.pop(step, None)  # damaged: write it again
        entries = self._coord.prepare(encoder.tensors) + mine.tensors
        run_start = self._run_start(committed)
        if self.async_save:
            # deduplicated: host tensors whose bytes a kept checkpoint holds are hashed now, not copied
            hashed = shared_content(entries, self._known_content(set(committed)), frozenset(self._changing)) \
                if self.dedup and self._hashes else {}
            entries = self._background.snapshot(entries, skip=hashed)
            before = set(committed)
            self._background.start(
                step,
                lambda: self._write(step, tree, entries, clean_metrics, clean_metadata, run_start, before, hashed),
                on_failure=self._count_background_failure,
            )
        else:
            try:
                self._write(step, tree, entries, clean_metrics, clean_metadata, run_start, set(committed))
            except SaveError as e:
                self._failed(e)
                return False
        self._last_save_time = time.monotonic()
        return True

    def _stage_ahead(self, state: Mapping[str, Any]) -> None:
        """async_save: allocate the staging buffers for ``state`` in the background, once, so that the first
        save's snapshot stalls no longer than the later ones (called by a restore and by a save that is not due)."""
        if not self.async_save or self._background.staged:
            return
        encoder = TreeEncoder()
        try:
            for k, v in state.items():
                if not isinstance(v, PerRank):
                    encoder.encode(v, (k,))
        except AutockptError:  # the save that is due raises it, with its message
            return
        self._background.prepare(self._coord.prepare(encoder.tensors))

    def _take_lease(self) -> LeaseError | StorageAccessError | SaveError | None:
        """Hold the writer lease (cleaning leftovers once it is ours); the problem, as an error, if that failed."""
        try:
            if self._lease.held:
                self._lease.guard()
            else:
                self._lease.acquire()
                self._cleanup()
        except LeaseError as e:
            return LeaseError(str(e))
        except Exception as e:
            why = access_problem(e)
            if why is not None:
                return StorageAccessError(f"cannot write checkpoints to {self.directory}: {why}")
            if isinstance(e, OSError):
                return SaveError(f"cannot write to {self.directory}: {e!r}")
            raise
        return None

    def _clean_at_start(self) -> None:
        """Remove a crash's leftovers (never a committed checkpoint) and unreferenced packs when the manager is
        created, under the writer lease, taken for it and released after: without it, a writer that takes the lease
        meanwhile (a paused one waking up, one started at the same moment) could see its files deleted. Nothing
        is removed while another live process holds the lease; another manager of this process is taken over
        as before (a notebook cell run again)."""
        lease = self._lease.read()
        if self._lease.live_other(lease):
            return
        listing = self.storage.scan()
        if not (listing.uncommitted or listing.temporary or self._blobs.packs() or self._blobs.leftovers()
                or self.storage.exists(LEASE_NAME)):
            return  # nothing to clean: the lease is left for the first save (or acquire) to take
        if self._lease.held_in_this_process(lease):
            self._cleanup()  # held by another manager of this process: no other process can write here
            self._lease.remove_stale()
            return
        try:
            self._lease.acquire()
        except LeaseError:
            return  # another writer took it at this moment: what is there may be its own
        except OSError:
            return  # a directory this process cannot write (a reader): the writer cleans up
        try:
            self._cleanup()
            self._lease.remove_stale()  # a dead writer's lease file of an older autockpt
        finally:
            self._lease.release()

    def _cleanup(self) -> None:
        """Remove leftovers of interrupted saves and finish an interrupted collection (the writer, no save in
        flight)."""
        self.storage.cleanup(self.storage.scan())
        collect(self.storage, self._manifest)

    def _known_content(self, committed: set[int]) -> dict[str, StoredContent]:
        """Content hash -> where its bytes lie, over the packs of the kept checkpoints that still exist."""
        packs: dict[str, int] | None = None
        known: dict[str, StoredContent] = {}
        for step in sorted(committed):
            try:
                m = self._manifest(step)
            except (CorruptCheckpointError, CheckpointNotFoundError):
                continue
            if not m.get("blobs"):
                continue
            if packs is None:
                packs = self._blobs.packs()  # once per save: a pack that went missing is not referred to again
            for t in m["tensors"].values():
                blob = t.get("blob")
                if blob is not None and packs.get(blob) == m["blobs"][blob]["size"]:
                    known[t[CONTENT_HASH]] = StoredContent(blob, (t["offsets"][0], t["offsets"][1]), packs[blob])
        return known

    def _write_deduplicated(
        self, step: int, entries: list[TensorEntry], make_manifest: Any, committed: set[int],
        on_bytes: Any, hashed: dict[str, str],
    ) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {"written": 0, "hashes": {}}

        def write_mine(mine: list[TensorEntry]) -> tuple[dict[str, Any], dict[str, Any]]:
            # on every rank, inside the save protocol: after the writer's collection that followed the last save
            known = self._known_content(committed)
            names = {e.name for e in mine}
            blobs, tensors, out["written"], out["hashes"] = write_deduplicated(
                self._blobs, step, mine, known, self.shard_bytes, on_bytes, frozenset(self._changing),
                {n: d for n, d in hashed.items() if n in names})
            return blobs, tensors

        manifest = self._coord.write(self.storage, step, entries, self.shard_bytes, make_manifest, on_bytes,
                                     dedup=write_mine)
        written, hashes = int(out["written"]), dict(out["hashes"])
        # tensors that changed since the previous save are written without hashing first at the next one
        self._changing = {n for n, d in hashes.items() if n in self._hashes and self._hashes[n] != d}
        self._hashes = hashes
        return manifest, written

    def _failed(self, error: SaveError, counted: bool = False) -> None:
        """Apply the failure policy: warn and go on, or raise at the N-th consecutive failure."""
        if not counted:
            self._failures += 1
        if self._failures >= self.max_consecutive_failures:
            raise error
        log.warning("autockpt: %s (failure %d in a row; training continues, the %d-th raises)", error,
                    self._failures, self.max_consecutive_failures)

    @staticmethod
    def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for k, v in (metrics or {}).items():
            if not isinstance(k, str):
                raise InvalidArgumentError(f"metric names must be str, got {k!r}")
            try:
                f = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"metric {k!r} must be a number, got {v!r}") from None
            out[k] = f if math.isfinite(f) else None
        return out

    def _run_start(self, committed: Mapping[int, str]) -> float:
        for step in sorted(committed, reverse=True):
            try:
                return float(self._manifest(step).get("run_start", self._manifest(step)["created"]))
            except (CorruptCheckpointError, CheckpointNotFoundError):
                continue
        return time.time()

    def _write(
        self,
        step: int,
        tree: dict[str, Any],
        entries: list[TensorEntry],
        metrics: dict[str, float | None],
        metadata: dict[str, Any],
        run_start: float,
        committed: set[int],
        hashed: dict[str, str] | None = None,
    ) -> None:
        """Write and commit one checkpoint, then prune; ``committed`` is what was on storage before it.
        ``hashed``: tensors an async save left out of its snapshot, by content hash (see ``shared_content``)."""
        t0 = time.perf_counter()
        total = sum(e.nbytes for e in entries)
        try:
            with ProgressReporter(total, f"autockpt: saving step {step}", self.progress) as bar:
                def make(files: Any, tensors: Any, blobs: Any = None) -> dict[str, Any]:
                    return {**new_manifest(step, tree, tensors, files, metrics, metadata, run_start, blobs),
                            "retention": self.policy.to_json()}  # what `autockpt ls` shows

                on_bytes = bar.update if bar.active else None
                if self.dedup:
                    manifest, written = self._write_deduplicated(step, entries, make, committed, on_bytes,
                                                                  hashed or {})
                else:
                    manifest = self._coord.write(self.storage, step, entries, self.shard_bytes, make,
                                                 on_bytes=on_bytes)
                    written = sum(f["size"] for f in manifest["files"].values())
        except SaveError:
            raise
        except Exception as e:
            if not isinstance(e, (OSError, TimeoutError, ConnectionError)) and not transient(e):
                raise  # a bug or a bad value, not a failure of the storage: never "warn and continue"
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SaveError(
                    f"no space left to save step {step} to {self.directory}: free space there or lower "
                    "max_to_keep. The partial files were removed; earlier checkpoints are intact."
                ) from e
            raise SaveError(
                f"saving step {step} to {self.directory} failed: {e!r}. Earlier checkpoints are intact."
            ) from e
        self._failures = 0
        self._manifests[step] = manifest
        secs = time.perf_counter() - t0
        size = referenced_bytes(manifest)
        log.info("autockpt: saved step %d to %s: %.1f MB in %.2f s (%.0f MB/s)%s", step, self.directory,
                 size / 1e6, secs, size / 1e6 / max(secs, 1e-9),
                 f"; {written / 1e6:.1f} MB written, the rest shared" if self.dedup else "")
        if self._coord.is_writer:  # the commit just checked the lease; each delete asks it again (storage.guard)
            self._prune(step, committed | {step})
            try:
                collect(self.storage, self._manifest)  # packs that only pruned checkpoints referred to
            except LeaseError:
                raise
            except OSError as e:  # the step is committed; what was not collected now, the next start collects
                log.warning("autockpt: collecting unreferenced packs of %s failed (%r); they are collected at the "
                            "next save or start", self.directory, e)
        elif self._tiers_shared:  # every rank removes its own local copies of what the policy drops
            self._prune(step, committed | {step})

    def _prune(self, just_saved: int, committed: set[int]) -> None:
        """Delete what the policy no longer keeps. ``committed`` needs no new listing: the lease makes this
        manager the only writer, so it is what was listed before the save plus the step just saved."""
        infos = []
        for step in sorted(committed):
            try:
                m = self._manifest(step)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                log.warning("autockpt: leaving unreadable checkpoint %s alone: %s", step_dirname(step), e)
                continue
            infos.append(CheckpointInfo.from_manifest(m))
        keep = self.policy.keep(infos) | {just_saved}
        for info in infos:
            if info.step not in keep:
                self.storage.delete(info.step)
                self._manifests.pop(info.step, None)
                log.debug("autockpt: deleted checkpoint %s (retention)", step_dirname(info.step))

    def _settle_uploads(self) -> None:
        """Wait up to ``upload_deadline_s`` for the ranks' backlog to upload (a failure: a warning; the steps it
        leaves not durable are read where they are, and skipped if a rank cannot read them)."""
        try:
            if not self.storage.wait_uploads(self.upload_deadline_s):
                log.warning("autockpt: uploads of %s did not finish within %g s before restoring", self.directory,
                            self.upload_deadline_s)
        except SaveError as e:
            log.warning("autockpt: %s", e)

    def _count_background_failure(self, error: BaseException) -> None:
        self._failures += 1

    def _wait(self) -> None:
        self._background.wait()

    def _join(self) -> None:
        self._background.join()

    def wait_until_finished(self, timeout: float | None = None) -> bool:
        """Block until the in-flight background save committed and (with ``local_dir``) every checkpoint is
        uploaded; False if ``timeout`` seconds passed first. Raises the background save's error if it failed,
        and ``SaveError`` if uploads failed repeatedly (the local copies are kept)."""
        self._join()
        return self.storage.wait_uploads(timeout)

    def durability(self, step: int, timeout: float | None = None) -> str:
        """Wait up to ``timeout`` (default ``upload_deadline_s``) for ``step`` to be durable; where it is, for a
        log line: the directory, or the local dir and whether the upload finished."""
        self._join()
        if self.options.local_dir is None:
            return self.directory
        self._stopping = True
        t0 = time.monotonic()
        try:
            done = self.storage.wait_uploads(self.upload_deadline_s if timeout is None else timeout)
        except SaveError as e:
            done, why = False, f"the upload failed: {e}"
        else:
            why = f"the upload did not finish within {self.upload_deadline_s:g} s"
        local = os.fspath(self.options.local_dir)
        if done and self.storage.durable_step == step:
            return f"{local} (durable on {self.directory} after {time.monotonic() - t0:.1f} s)"
        return (f"{local} (NOT durable: {why}; it uploads at the next start, or run: autockpt sync {local} "
                f"{self.directory})")

    def close(self) -> None:
        """Finish the in-flight save and the uploads (raising an error, if any). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._join()
            if not self._stopping:  # preempted: durability() waited up to upload_deadline_s already
                self.storage.wait_uploads()
        finally:
            self.storage.close()
            self._lease.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # do not hide the exception that is already propagating
            log.error("autockpt: while closing after an error: %r", e)

    # ------------------------------------------------------------------------------------------ restoring
    def _per_rank_restored(self, step: int, state: Mapping[str, Any], saved_by: dict[str, int]) -> None:
        """On another number of processes than saved: derive the new ranks' RNGs and say once why the resume
        is not bit-exact. Also say it when per-rank values come from a checkpoint that held one copy."""
        rank, world = self._coord.rank, self._coord.world_size
        keys = [k for k, v in state.items() if isinstance(v, PerRank)]
        for k in keys:
            if k in saved_by and rank >= saved_by[k]:
                per_rank.derive_new_rank(state[k].value, rank)
        other = sorted({saved_by[k] for k in keys if k in saved_by and saved_by[k] != world})
        single = [k for k in keys if k not in saved_by] if world > 1 else []
        if not self._coord.is_writer:
            return
        if other:
            saved = other[0]
            if world > saved:
                how = (f"ranks {saved}..{world - 1} have no saved per-rank state ({', '.join(keys)}): rank r starts "
                       f"from saved rank r % {saved}'s, its RNGs reseeded deterministically from it and r")
            else:
                how = f"the saved per-rank state ({', '.join(keys)}) of ranks {world}..{saved - 1} is not used"
            log.warning("autockpt: step %d of %s was saved by %d process(es) and is restored on %d, so this resume "
                        "cannot be bit-exact: %s; random draws (dropout, augmentation) and the batches each rank "
                        "gets differ from an uninterrupted run (with autockpt.ResumableLoader no sample of the "
                        "epoch is repeated or skipped)", step, self.directory, saved, world, how)
        elif single:
            log.warning("autockpt: step %d of %s holds one copy of %s (saved without per-rank state): all %d ranks "
                        "get it, so this resume is not bit-exact (each rank's own random stream was not saved)",
                        step, self.directory, ", ".join(single), world)

    def restore(self, state: MutableMapping[str, Any], step: int | None = None) -> int | None:
        """Restore a checkpoint into ``state`` in place; returns its step, or None if there is none.

        With ``step=None`` the newest checkpoint that verifies is used: a damaged newer one is skipped with
        a warning naming it. Everything is checked before anything is copied: a checkpoint that does not fit
        ``state`` (missing, unexpected or reshaped keys) raises ``StateMismatchError`` and leaves the
        targets untouched.
        """
        if not isinstance(state, MutableMapping) or not all(isinstance(k, str) for k in state):
            raise InvalidArgumentError("state must be a dict with str keys, e.g. {'model': model}")
        self._wait()
        if self._tiers_shared:  # a step only on the ranks' local dirs: each rank needs the others' files uploaded
            self._settle_uploads()
        committed = self._coord.broadcast_from_writer(self.storage.scan().committed)
        if step is not None:
            if step not in committed:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint at step {step} in {self.directory}; have {sorted(committed)}"
                )
            steps = [step]
        else:
            steps = sorted(committed, reverse=True)
        t0 = time.perf_counter()
        def verify(s: int) -> Checkpoint:
            return self._coord.run_raising_everywhere(self._from_a_copy, s, lambda c: open_checkpoint(c, s))

        found = newest_that_verifies(steps, verify, strict=step is not None)
        if found is None:  # a fresh run: its first save is due soon
            self._stage_ahead(state)
            return None
        s, ckpt = found
        self._verified.add(self._identity(ckpt.manifest))
        size = referenced_bytes(ckpt.manifest)
        targets = per_rank.unwrap(state)
        with ckpt, ProgressReporter(size, f"autockpt: restoring step {s}", self.progress) as bar:
            tree, saved_by = self._coord.run_raising_everywhere(
                per_rank.select, ckpt.manifest["state"], self._coord.rank, f"{self.directory} {step_dirname(s)}")
            self._coord.run_raising_everywhere(fit.check, targets, tree, ckpt.metas)
            ckpt.on_bytes = bar.update
            fit.apply(targets, tree, ckpt.tensor)
        for key, value in state.items():  # plain values were replaced in `targets`
            if isinstance(value, PerRank):
                value.value = targets[key]
            else:
                state[key] = targets[key]
        self._per_rank_restored(s, state, saved_by)
        self._stage_ahead(state)
        secs = time.perf_counter() - t0
        log.info("autockpt: restored step %d from %s: %.1f MB in %.2f s (%.0f MB/s)", s, self.directory,
                 size / 1e6, secs, size / 1e6 / max(secs, 1e-9))
        return s

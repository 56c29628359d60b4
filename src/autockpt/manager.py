"""``CheckpointManager``: when to save, what to keep, and restoring the newest checkpoint that verifies."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from autockpt import state as state_mod
from autockpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    SaveError,
    UnsupportedValueError,
)
from autockpt.format import (
    CHECKSUM,
    TENSORS_NAME,
    TensorEntry,
    TreeEncoder,
    decode_tree,
    dump_manifest,
    is_torch_tensor,
    iter_tensor_nodes,
    json_plain,
    new_manifest,
    parse_manifest,
    parse_safetensors_header,
    tensor_from_buffer,
    write_safetensors,
)
from autockpt.retention import CheckpointInfo, KeepBest, RetentionPolicy
from autockpt.storage import Storage, step_dirname

log = logging.getLogger("autockpt")


@dataclass
class Checkpoint:
    """A committed checkpoint whose files were read and verified (sizes, checksums, headers)."""

    step: int
    manifest: dict[str, Any]
    buffers: dict[str, tuple[Any, int]]  # file name -> (buffer, data start)

    @property
    def metas(self) -> dict[str, state_mod.TensorMeta]:
        return {
            n: state_mod.TensorMeta(n, t["dtype"], tuple(t["shape"])) for n, t in self.manifest["tensors"].items()
        }

    def tensor(self, name: str, owned: bool = True) -> Any:
        meta = self.manifest["tensors"][name]
        buf, start = self.buffers[meta["file"]]
        return tensor_from_buffer(buf, start, meta, owned)

    def state(self) -> dict[str, Any]:
        """The whole state as plain values and tensors with their own memory."""
        return {k: decode_tree(v, self.tensor, (k,)) for k, v in self.manifest["state"].items()}


def read_manifest(storage: Storage, step: int) -> dict[str, Any]:
    where = f"{storage.url} {step_dirname(step)}"
    manifest = parse_manifest(storage.read_manifest(step), where)
    if manifest["step"] != step:
        raise CorruptCheckpointError(f"{where}: manifest says step {manifest['step']}")
    return manifest


def open_checkpoint(storage: Storage, step: int, manifest: dict[str, Any] | None = None) -> Checkpoint:
    """Read and verify one checkpoint; raises CorruptCheckpointError or CheckpointNotFoundError."""
    where = f"{storage.url} {step_dirname(step)}"
    if manifest is None:
        manifest = read_manifest(storage, step)
    tensors = manifest["tensors"]
    for name in iter_tensor_nodes(manifest["state"]):
        if name not in tensors:
            raise CorruptCheckpointError(f"{where}: the state refers to tensor {name!r} the manifest does not list")
    buffers: dict[str, tuple[Any, int]] = {}
    for fname, info in manifest["files"].items():
        buf = storage.read_payload(step, fname, info["size"])
        if xxhash.xxh3_64_hexdigest(buf) != info[CHECKSUM]:
            raise CorruptCheckpointError(f"{where}: {fname} does not match its checksum")
        start, header = parse_safetensors_header(buf, info["size"], f"{where}/{fname}")
        mine = {n: t for n, t in tensors.items() if t["file"] == fname}
        if set(header) != set(mine):
            raise CorruptCheckpointError(f"{where}: {fname} holds other tensors than the manifest lists")
        for n, t in mine.items():
            h = header[n]
            if (h["dtype"], list(h["shape"]), list(h["data_offsets"])) != (
                t.get("dtype"), t.get("shape"), t.get("offsets")
            ):
                raise CorruptCheckpointError(f"{where}: tensor {n!r} differs between the manifest and {fname}")
        buffers[fname] = (buf, start)
    return Checkpoint(step, manifest, buffers)


def load(url: str | os.PathLike[str], step: int | None = None, storage_options: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """Read a checkpoint without a model: the nested state as tensors, numpy arrays and Python values.

    Read-only: it never writes, cleans or prunes, so it is safe beside a running job. With ``step=None`` it
    reads the newest checkpoint that verifies (falling back, with a warning, past damaged ones).

    ```python
    state = autockpt.load("runs/exp1")
    weights = state["model"]          # the model's state dict, as saved
    ```
    """
    storage = Storage(url, storage_options)
    steps = [step] if step is not None else sorted(storage.scan().committed, reverse=True)
    for s in steps:
        try:
            return open_checkpoint(storage, s).state()
        except CorruptCheckpointError as e:
            if step is not None:
                raise
            log.warning("autockpt: skipping checkpoint %s: %s", step_dirname(s), e)
    raise CheckpointNotFoundError(f"no valid checkpoint in {storage.url}")


def _check_interval(name: str, value: Any, kind: type) -> None:
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or value <= 0 or (kind is float and not math.isfinite(value)):
        raise InvalidArgumentError(f"{name} must be a positive {kind.__name__} or None, got {value!r}")


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

    A step is the number of completed optimizer updates; the checkpoint of step N holds the state after N
    updates. The state is a mapping of names to objects with ``state_dict()``/``load_state_dict()`` (torch
    modules, optimizers, schedulers, ``autockpt.RNGState()``), tensors, numpy arrays and plain values.

    ```python
    import torch, autockpt
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    with autockpt.CheckpointManager("/tmp/ckpt_demo", max_to_keep=3) as mgr:
        start = mgr.restore({"model": model, "opt": opt}) or 0
        for step in range(start + 1, start + 11):
            opt.zero_grad(); model(torch.randn(8, 4)).sum().backward(); opt.step()
            mgr.save(step, {"model": model, "opt": opt}, metrics={"loss": 0.1})
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
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise InvalidArgumentError(f"directory must be a non-empty path or URL string, got {directory!r}")
        self.policy = RetentionPolicy(max_to_keep, keep_every_n_hours, keep_best)
        _check_interval("save_interval_steps", save_interval_steps, int)
        _check_interval("save_interval_seconds", save_interval_seconds, float)
        if not isinstance(async_save, bool):
            raise InvalidArgumentError(f"async_save must be True or False, got {async_save!r}")
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InvalidArgumentError(f"storage_options must be a dict or None, got {storage_options!r}")
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.async_save = async_save
        self.storage = Storage(directory, dict(storage_options or {}))
        self.directory = self.storage.url
        self._manifests: dict[int, dict[str, Any]] = {}
        self._last_save_time = time.monotonic()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.storage.cleanup(self.storage.scan())

    # ------------------------------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Steps of every committed checkpoint, oldest first (committed does not mean verified)."""
        return sorted(self.storage.scan().committed)

    def _manifest(self, step: int) -> dict[str, Any]:
        if step not in self._manifests:
            self._manifests[step] = read_manifest(self.storage, step)
        return self._manifests[step]

    def _files_present(self, step: int, manifest: dict[str, Any]) -> None:
        for fname, info in manifest["files"].items():
            path = self.storage.path(step_dirname(step), fname)
            try:
                size = os.path.getsize(path) if self.storage.atomic_rename else self.storage.fs.size(path)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{path} is missing") from None
            if size != info["size"]:
                raise CorruptCheckpointError(f"{path} has {size} bytes, the manifest says {info['size']}")

    @property
    def latest_step(self) -> int | None:
        """The newest committed checkpoint whose manifest verifies and whose files have their recorded sizes.

        ``restore`` also verifies every checksum, and falls back past a checkpoint that fails.
        """
        self._join()
        for step in sorted(self.storage.scan().committed, reverse=True):
            try:
                self._files_present(step, self._manifest(step))
                return step
            except CorruptCheckpointError as e:
                log.warning("autockpt: checkpoint %s does not verify: %s", step_dirname(step), e)
        return None

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
        if not force and not self.should_save(step):
            return False
        clean_metrics = self._clean_metrics(metrics)
        clean_metadata = json_plain(dict(metadata or {}), "metadata")
        self._join()
        committed = self.storage.scan().committed
        if step in committed:
            try:
                self._files_present(step, self._manifest(step))
                log.info("autockpt: step %d already has a committed checkpoint; not saving it again", step)
                return False
            except CorruptCheckpointError:
                self._manifests.pop(step, None)  # damaged: write it again
        encoder = TreeEncoder()
        tree = {k: encoder.encode(v, (k,)) for k, v in state.items()}
        entries = encoder.tensors
        run_start = self._run_start(committed)
        if self.async_save:
            entries = [TensorEntry(e.name, _host_copy(e.value), e.framework, e.dtype, e.shape) for e in entries]
            self._thread = threading.Thread(
                target=self._write_in_background,
                args=(step, tree, entries, clean_metrics, clean_metadata, run_start),
                name=f"autockpt-save-{step}",
                daemon=True,
            )
            self._thread.start()
        else:
            self._write(step, tree, entries, clean_metrics, clean_metadata, run_start)
        self._last_save_time = time.monotonic()
        return True

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
    ) -> None:
        t0 = time.perf_counter()
        try:
            with self.storage.writer(step) as w:
                with w.open(TENSORS_NAME) as f:
                    size, digest, offsets = write_safetensors(f, entries)
                tensors = {
                    e.name: {"file": TENSORS_NAME, "dtype": e.dtype, "shape": e.shape,
                             "offsets": offsets[e.name], "framework": e.framework}
                    for e in entries
                }
                files = {TENSORS_NAME: {"size": size, CHECKSUM: digest}}
                manifest = new_manifest(step, tree, tensors, files, metrics, metadata, run_start)
                w.commit(dump_manifest(manifest))
        except UnsupportedValueError:
            raise
        except Exception as e:
            raise SaveError(
                f"saving step {step} to {self.directory} failed: {e!r}. Earlier checkpoints are intact."
            ) from e
        self._manifests[step] = manifest
        secs = time.perf_counter() - t0
        log.info("autockpt: saved step %d to %s: %.1f MB in %.2f s (%.0f MB/s)", step, self.directory,
                 size / 1e6, secs, size / 1e6 / max(secs, 1e-9))
        self._prune(step)

    def _write_in_background(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # surfaced by the next save()/wait_until_finished()/close()
            log.error("autockpt: background save of step %d failed: %r", args[0], e)
            self._error = e

    def _prune(self, just_saved: int) -> None:
        infos = []
        for step in self.storage.scan().committed:
            try:
                m = self._manifest(step)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                log.warning("autockpt: leaving unreadable checkpoint %s alone: %s", step_dirname(step), e)
                continue
            metrics = {k: v for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float))}
            infos.append(CheckpointInfo(step, float(m["created"]), float(m.get("run_start", m["created"])), metrics))
        keep = self.policy.keep(infos) | {just_saved}
        for info in infos:
            if info.step not in keep:
                self.storage.delete(info.step)
                self._manifests.pop(info.step, None)
                log.debug("autockpt: deleted checkpoint %s (retention)", step_dirname(info.step))

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def wait_until_finished(self) -> None:
        """Block until the in-flight background save committed; raise its error if it failed."""
        self._join()

    def close(self) -> None:
        """Finish the in-flight save (raising its error, if any). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._join()

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
    def restore(self, state: MutableMapping[str, Any], step: int | None = None) -> int | None:
        """Restore a checkpoint into ``state`` in place; returns its step, or None if there is none.

        With ``step=None`` the newest checkpoint that verifies is used: a damaged newer one is skipped with
        a warning naming it. Everything is checked before anything is copied: a checkpoint that does not fit
        ``state`` (missing, unexpected or reshaped keys) raises ``StateMismatchError`` and leaves the
        targets untouched.
        """
        if not isinstance(state, MutableMapping) or not all(isinstance(k, str) for k in state):
            raise InvalidArgumentError("state must be a dict with str keys, e.g. {'model': model}")
        self._join()
        committed = self.storage.scan().committed
        if step is not None:
            if step not in committed:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint at step {step} in {self.directory}; have {sorted(committed)}"
                )
            steps = [step]
        else:
            steps = sorted(committed, reverse=True)
        for s in steps:
            try:
                ckpt = open_checkpoint(self.storage, s)
            except CorruptCheckpointError as e:
                if step is not None:
                    raise
                log.warning("autockpt: checkpoint %s does not verify, falling back to an older one: %s",
                            step_dirname(s), e)
                continue
            state_mod.check(state, ckpt.manifest["state"], ckpt.metas)
            state_mod.apply(state, ckpt.manifest["state"], ckpt.tensor)
            log.info("autockpt: restored step %d from %s", s, self.directory)
            return s
        return None


def _host_copy(value: Any) -> Any:
    """A private host-memory copy of a tensor, so later updates to the original cannot reach the save."""
    if is_torch_tensor(value):
        return value.detach().to("cpu", copy=True)
    return np.array(value, copy=True)

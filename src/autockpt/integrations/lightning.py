"""PyTorch Lightning: ``AutoCheckpoint``, a callback that saves the whole training state and resumes on its own.

```python
import lightning as L
from autockpt.integrations.lightning import AutoCheckpoint

trainer = L.Trainer(max_steps=50_000, callbacks=[AutoCheckpoint("s3://bucket/run9", every_n_train_steps=500,
                                                                max_to_keep=3, keep_every_n_hours=6)])
trainer.fit(model, datamodule=dm)    # the same call after a crash continues where it stopped
```

How it hooks into Lightning (2.6; see ``SUPPORTED_LIGHTNING``):

- Saving: at the end of a training batch that is due, the callback asks Lightning for its full checkpoint
  dictionary (the same one ``Trainer.save_checkpoint`` writes: weights, optimizers, LR schedulers, loops with the
  mid-epoch position, precision/scaler state, callback states, ``global_step``, epoch) and stores it with
  :class:`~autockpt.CheckpointManager` under the name ``"lightning"``: tensors in safetensors, the rest as JSON,
  never pickle. Only global rank 0 writes; every rank waits at a barrier until the checkpoint is committed.
- Resuming: in the ``setup`` hook, which Lightning calls before it restores a checkpoint, the callback reads the
  newest checkpoint that verifies and hands the dictionary to Lightning's own restore step, exactly as if it had
  been loaded from ``ckpt_path``. Lightning then restores everything in its usual order. An explicit
  ``trainer.fit(..., ckpt_path=...)`` still wins.
- Data order: the sampler under the training ``DataLoader``'s ``BatchSampler`` is wrapped so that each epoch's
  order is fixed by a seed and the epoch number, and on a mid-epoch resume the epoch continues after the batches
  already trained, without loading them. The global RNGs (Python, NumPy, torch) are saved with each checkpoint
  and put back right before the first resumed batch.
- Preemption: SIGTERM/SIGUSR1 set a flag (Lightning's own handlers, SLURM's included, keep running); at the end
  of the current batch all ranks agree, the callback saves, and ``trainer.fit`` returns normally.

The only private Lightning attributes used are in ``_dump_lightning_checkpoint``, ``_inject_lightning_checkpoint``
and ``_clear_lightning_sigterm``; ``tests/test_lightning.py`` pins them.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from autockpt.errors import CheckpointNotFoundError, InvalidArgumentError, SaveError, StateMismatchError
from autockpt.format import is_stateful
from autockpt.manager import CheckpointManager
from autockpt.preemption import DEFAULT_SIGNALS, PreemptionWatcher
from autockpt.reader import load
from autockpt.retention import KeepBest, RetentionPolicy
from autockpt.rng import RNGState

log = logging.getLogger("autockpt")

SUPPORTED_LIGHTNING = ">=2.6,<2.7 (tested with lightning 2.6.6 and pytorch_lightning 2.6.6)"
STATE_NAME = "lightning"


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` class from each installed package, so both ``Trainer`` classes accept us."""
    bases = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "autockpt.integrations.lightning needs PyTorch Lightning: pip install lightning (or pytorch_lightning)"
        )
    return tuple(bases)


_Base: Any = type("_LightningCallbackBase", _callback_bases(), {})


# --------------------------------------------------------------------------------- Lightning internals
# Everything private this integration touches is here (Lightning 2.6). tests/test_lightning.py pins it.


def _dump_lightning_checkpoint(trainer: Any) -> dict[str, Any]:
    """The dictionary ``Trainer.save_checkpoint`` would write (runs the ``on_save_checkpoint`` hooks)."""
    return dict(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))


def _inject_lightning_checkpoint(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Make Lightning restore ``checkpoint`` as if it had loaded it from ``ckpt_path``.

    Called in the ``setup`` hook: Lightning's ``resume_start(None)`` leaves a pre-loaded checkpoint in place, and
    its ``restore_model``/``restore_callbacks``/``restore_training_state`` then restore from it and free it.
    """
    trainer._checkpoint_connector._loaded_checkpoint = checkpoint


def _clear_lightning_sigterm(trainer: Any) -> None:
    """After our preemption save, stop Lightning raising ``SIGTERMException`` so ``fit`` returns normally."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "received_sigterm"):
        connector.received_sigterm = False


# --------------------------------------------------------------------------------- data order


class _SeededEpochSampler:
    """Wraps the sampler under a ``BatchSampler``: the order of an epoch is fixed by ``seed`` and the epoch.

    The wrapped sampler is listed once per epoch with torch's global generator seeded from ``(seed, epoch)``
    (the caller's generator is left as it was); a sampler with its own ``generator`` gets that generator's state
    at the start of the epoch back when the same epoch is listed again. ``resume_at=(epoch, batches)`` makes the
    next listing of ``epoch`` start after ``batches`` batches, without loading them.
    """

    def __init__(self, inner: Any, batch_size: int, seed: int) -> None:
        self.inner = inner
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.gen_epoch: int | None = None
        self.gen_state: Any = None
        self.resume_at: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        import torch

        epoch = self.epoch
        gen = getattr(self.inner, "generator", None)
        if isinstance(gen, torch.Generator):
            if self.gen_epoch == epoch and self.gen_state is not None:
                gen.set_state(self.gen_state)
            else:
                self.gen_epoch, self.gen_state = epoch, gen.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.seed + 1_000_003 * epoch) % 2**63)
            indices = list(self.inner)
        skip = 0
        if self.resume_at is not None:
            at_epoch, batches = self.resume_at
            self.resume_at = None
            if at_epoch == epoch:
                skip = batches * self.batch_size
        return iter(indices[skip:])


def _flat_loaders(obj: Any) -> list[Any]:
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        return [x for v in obj.values() for x in _flat_loaders(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _flat_loaders(v)]
    return [obj]


# --------------------------------------------------------------------------------- the callback


def _positive(name: str, value: Any, kind: type) -> None:
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) and value > 0
    if not ok:
        raise InvalidArgumentError(f"{name} must be a positive {kind.__name__} or None, got {value!r}")


class AutoCheckpoint(_Base):
    """Saves the full Lightning training state with autockpt, and resumes from it with no ``ckpt_path``.

    Args:
        directory: a local path or fsspec URL (``s3://bucket/run9``); one directory per run.
        every_n_train_steps: save when ``trainer.global_step`` is a multiple of this.
        train_time_interval: save when this much time (``datetime.timedelta`` or seconds) passed since the last save.
        every_n_epochs: save at the end of every N-th epoch (its last batch). The default when no trigger is given
            is ``every_n_epochs=1``. The last step of the run is always saved.
        max_to_keep: how many of the newest checkpoints to keep (``None``: all).
        keep_every_n_hours: also keep one checkpoint per N hours of the run, forever.
        monitor, mode, save_top_k: also keep the ``save_top_k`` best checkpoints by the logged metric ``monitor``
            (from ``trainer.callback_metrics``), lower is better with ``mode="min"``.
        storage_options: passed to fsspec (credentials, endpoint URL, ...).
        preemption_signals: signals that mean "save and stop at the end of this batch"; ``None`` turns it off.

    After ``fit``: ``restored_step`` is the step it resumed from (``None`` for a fresh start) and ``preempted``
    says whether a signal stopped the run (the checkpoint was written; run the same ``fit`` again to continue).

    ```python
    import lightning as L, torch
    from torch.utils.data import DataLoader, TensorDataset
    from autockpt.integrations.lightning import AutoCheckpoint

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__(); self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            x, y = batch; return torch.nn.functional.mse_loss(self.layer(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8, shuffle=True)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        callbacks=[AutoCheckpoint("/tmp/autockpt_lightning_demo", every_n_train_steps=4)])
    trainer.fit(Net(), data)   # run it again: it resumes, here finding the run complete
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        every_n_train_steps: int | None = None,
        train_time_interval: datetime.timedelta | float | None = None,
        every_n_epochs: int | None = None,
        max_to_keep: int | None = 5,
        keep_every_n_hours: float | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        storage_options: dict[str, Any] | None = None,
        preemption_signals: Iterable[int | str] | None = DEFAULT_SIGNALS,
    ) -> None:
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise InvalidArgumentError(f"directory must be a non-empty path or URL string, got {directory!r}")
        _positive("every_n_train_steps", every_n_train_steps, int)
        _positive("every_n_epochs", every_n_epochs, int)
        if isinstance(train_time_interval, datetime.timedelta):
            train_time_interval = train_time_interval.total_seconds()
            if train_time_interval <= 0:
                raise InvalidArgumentError("train_time_interval must be a positive timedelta or number of seconds")
        _positive("train_time_interval", train_time_interval, float)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise InvalidArgumentError(f"monitor must be a metric name (str) or None, got {monitor!r}")
        if monitor is None and (save_top_k != 1 or mode != "min"):
            raise InvalidArgumentError("mode and save_top_k need monitor='<logged metric name>' to rank checkpoints by")
        keep_best = KeepBest(monitor, mode=mode, k=save_top_k) if monitor is not None else None  # type: ignore[arg-type]
        self._policy = RetentionPolicy(max_to_keep, keep_every_n_hours, keep_best)  # validates the options
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InvalidArgumentError(f"storage_options must be a dict or None, got {storage_options!r}")
        if every_n_train_steps is None and train_time_interval is None and every_n_epochs is None:
            every_n_epochs = 1
        self.directory = os.fspath(directory)
        self.every_n_train_steps = every_n_train_steps
        self.train_time_interval = train_time_interval
        self.every_n_epochs = every_n_epochs
        self.monitor = monitor
        self.storage_options = dict(storage_options or {})
        self._watcher = PreemptionWatcher(preemption_signals) if preemption_signals is not None else None
        self.restored_step: int | None = None
        self.preempted = False
        self._manager: CheckpointManager | None = None
        self._seed: int | None = None
        self._samplers: list[_SeededEpochSampler] = []
        self._pending: dict[str, Any] | None = None
        self._batches_done = 0
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()

    @property
    def state_key(self) -> str:
        return str(self._generate_state_key(directory=self.directory))

    # ------------------------------------------------------------------ resume
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.preempted = False
        self.restored_step = None
        if trainer.is_global_zero:
            # only global rank 0 has a manager; this callback agrees with the other ranks itself
            self._manager = CheckpointManager(self.directory, self._policy.max_to_keep,
                                              self._policy.keep_every_n_hours, self._policy.keep_best,
                                              storage_options=self.storage_options, distributed=False)
            step = self._manager.latest_step
        else:
            step = None
        step = trainer.strategy.broadcast(step, src=0)
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        if step is None:
            return
        try:
            state = load(self.directory, step, storage_options=self.storage_options)
        except CheckpointNotFoundError:  # pragma: no cover - rank 0 just saw it
            raise
        ckpt = state.get(STATE_NAME)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
            raise StateMismatchError(
                f"the checkpoint of step {step} in {self.directory} was not written by "
                "autockpt.integrations.lightning.AutoCheckpoint (no Lightning checkpoint under 'lightning'); "
                "use an empty directory for this run"
            )
        _inject_lightning_checkpoint(trainer, ckpt)
        self.restored_step = step
        log.info("autockpt: resuming Lightning training from step %d in %s", step, self.directory)

    def state_dict(self) -> dict[str, Any]:
        sampler = self._samplers[0] if len(self._samplers) == 1 else None
        return {
            "seed": self._seed,
            "epoch": sampler.epoch if sampler is not None else None,
            "batches_done": self._batches_done,
            "gen_epoch": sampler.gen_epoch if sampler is not None else None,
            "gen_state": sampler.gen_state if sampler is not None else None,
            "rng": RNGState().state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
        if state_dict.get("seed") is not None:
            self._seed = int(state_dict["seed"])

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._watcher is not None:
            self._watcher.received = None
            self._watcher.install()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        import torch

        if self._seed is None:
            self._seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self._samplers = []
        unwrappable = []
        for dl in _flat_loaders(trainer.train_dataloader):
            bs = getattr(dl, "batch_sampler", None)
            if is_stateful(dl):
                continue  # Lightning saves and restores its position itself
            if type(bs) is torch.utils.data.BatchSampler:
                if not isinstance(bs.sampler, _SeededEpochSampler):
                    bs.sampler = _SeededEpochSampler(bs.sampler, bs.batch_size, self._seed)
                bs.sampler.seed = self._seed
                bs.sampler.epoch = int(trainer.current_epoch)
                self._samplers.append(bs.sampler)
            else:
                unwrappable.append(dl)
        pending = self._pending
        if pending is None or pending.get("epoch") is None:
            if pending is not None and pending.get("batches_done") and (unwrappable or len(self._samplers) > 1):
                self._warn_inexact()
            return
        if len(self._samplers) == 1 and not unwrappable:
            s = self._samplers[0]
            s.resume_at = (int(pending["epoch"]), int(pending["batches_done"]))
            if pending.get("gen_epoch") is not None:
                s.gen_epoch, s.gen_state = int(pending["gen_epoch"]), pending["gen_state"]
        else:
            self._warn_inexact()

    def _warn_inexact(self) -> None:
        warnings.warn(
            "autockpt: resuming mid-epoch, but the training data cannot be positioned exactly (more than one "
            "train dataloader, an IterableDataset, or a custom batch_sampler without state_dict/load_state_dict). "
            "Lightning restarts this epoch's iteration from its beginning, so batches already seen in this epoch "
            "are seen again. Use one map-style DataLoader, a stateful loader (torchdata StatefulDataLoader), or "
            "save only at epoch ends (every_n_epochs).",
            UserWarning,
            stacklevel=2,
        )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            rng = self._pending.get("rng")
            self._pending = None
            if rng is not None:
                RNGState().load_state_dict(rng)

    # ------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches_done = batch_idx + 1
        step = int(trainer.global_step)
        strategy = trainer.strategy
        preempt = self._watcher is not None and self._watcher.triggered
        if trainer.world_size > 1:
            preempt = bool(strategy.reduce_boolean_decision(preempt, all=False))
        if step == self._last_saved_step or step == 0:
            due = False
        else:
            due = self.every_n_train_steps is not None and step % self.every_n_train_steps == 0
            last_batch = self._batches_done >= trainer.num_training_batches
            if self.every_n_epochs is not None and last_batch:
                due = due or (trainer.current_epoch + 1) % self.every_n_epochs == 0
            if 0 < trainer.max_steps <= step:
                due = True
            if last_batch and trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs:
                due = True
            if self.train_time_interval is not None:
                timed = time.monotonic() - self._last_save_time >= self.train_time_interval
                due = due or bool(strategy.broadcast(timed, src=0) if trainer.world_size > 1 else timed)
        if due or (preempt and step != self._last_saved_step):
            self._save(trainer, step)
        if preempt:
            self.preempted = True
            trainer.should_stop = True
            _clear_lightning_sigterm(trainer)
            log.warning("autockpt: preempted; saved step %d and stopping", step)

    def _save(self, trainer: Any, step: int) -> None:
        ckpt = _dump_lightning_checkpoint(trainer)
        error: BaseException | None = None
        if trainer.is_global_zero:
            assert self._manager is not None
            metrics = {}
            if self.monitor is not None and self.monitor in trainer.callback_metrics:
                metrics[self.monitor] = trainer.callback_metrics[self.monitor]
            try:
                self._manager.save(step, {STATE_NAME: ckpt}, metrics=metrics, force=True,
                                   metadata={"epoch": int(trainer.current_epoch), "integration": "lightning"})
            except BaseException as e:  # every rank must learn of it, or the others wait at the barrier
                error = e
        failed = trainer.strategy.reduce_boolean_decision(error is not None, all=False) \
            if trainer.world_size > 1 else error is not None
        if error is not None:
            raise error
        if failed:
            raise SaveError(f"rank 0 failed to save step {step} to {self.directory}; see its error")
        trainer.strategy.barrier("autockpt_save")
        self._last_saved_step = step
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------ cleanup
    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.uninstall()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_watching()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop_watching()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop_watching()
        if self._manager is not None:
            self._manager.close()
            self._manager = None


__all__ = ["AutoCheckpoint", "SUPPORTED_LIGHTNING"]

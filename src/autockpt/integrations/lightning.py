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
  already trained, without loading them (under DDP, on each rank from its own ``DistributedSampler`` shard).
  The global RNGs (Python, NumPy, torch) of every rank are saved with each checkpoint and each rank's are put
  back into that rank right before the first resumed batch.
- Preemption: SIGTERM/SIGUSR1 only set a flag, from ``setup`` (before the restore) to the end of ``fit``; once
  Lightning installed its own SIGTERM handler the callback puts its handler back on top, so Lightning never raises
  its ``SIGTERMException`` (handlers installed before ``fit`` still run). The flag is acted on at points where all
  ranks agree and the state is a valid resume point: the end of a training batch inside an epoch, the start of an
  epoch (after the previous epoch's validation and ``on_train_epoch_end``), and the end of training. A signal in
  the last batch of an epoch or during its validation lets that validation and epoch end finish first, so the
  resumed run is exact. After the save the process leaves with exit code ``128 + signal`` once ``fit``'s teardown
  is done (``exit_on_preemption=False``: ``fit`` returns and ``exit_code`` says it).
- Saves due at an epoch's last batch are taken at the epoch boundary, after validation and ``on_train_epoch_end``,
  so a checkpoint carries the validation metric of its own weights and the callbacks' epoch-end state
  (EarlyStopping, ...). The last step is always saved; a run that ``trainer.should_stop`` ended is recorded as
  finished and running the same ``fit`` again trains nothing.

The only private Lightning attributes used are in ``_dump_lightning_checkpoint``, ``_inject_lightning_checkpoint``,
``_as_between_epochs``, ``_clear_lightning_sigterm`` and
``_exit_after_teardown``; ``tests/test_lightning.py`` pins them.

One job: the Lightning callback. Imports lightning and ``autockpt.errors``, ``format``, ``manager``,
``options``, ``preemption``, ``reader``, ``retention`` and ``rng``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import logging
import os
import signal
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from autockpt.errors import (
    CheckpointNotFoundError,
    InvalidArgumentError,
    LeaseError,
    SaveError,
    StateMismatchError,
    StorageAccessError,
    UnsupportedValueError,
)
from autockpt.format import TreeEncoder, is_stateful
from autockpt.manager import CheckpointManager
from autockpt.options import ManagerOptions, check_bool, check_directory, check_positive
from autockpt.preemption import DEFAULT_SIGNALS, PreemptionWatcher
from autockpt.reader import load
from autockpt.retention import KeepBest
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


def _as_between_epochs(ckpt: dict[str, Any]) -> None:
    """A checkpoint dumped in ``on_train_epoch_start`` made to look as if taken between the two epochs.

    Lightning counts the epoch as "ready" just before that hook; with the count taken back, its restore sees all
    previous epochs completed and nothing started, and starts the next epoch from its first batch (a checkpoint
    dumped after the increment would resume into the finished previous epoch instead).
    """
    loop = ckpt["loops"]["fit_loop"]
    progress = loop["epoch_progress"]
    for counts in (progress["total"], progress["current"]):
        if counts["ready"] == counts["started"] + 1:
            counts["ready"] -= 1
    # the batch counters of the epoch that ended, as Lightning resets them when an epoch starts (with max_steps
    # Lightning restores as "restarting" and would otherwise take the new epoch for the finished one)
    batches = loop["epoch_loop.batch_progress"]
    batches["current"] = {k: 0 for k in batches["current"]}
    batches["is_last_batch"] = False


def _clear_lightning_sigterm(trainer: Any) -> None:
    """Forget a SIGTERM Lightning's handler saw, so Lightning does not raise ``SIGTERMException`` for it."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "received_sigterm"):
        connector.received_sigterm = False


def _exit_after_teardown(trainer: Any, code: int) -> None:
    """Leave the process with ``code`` once ``fit`` finished its teardown.

    ``profiler.describe()`` is the last call of Lightning's teardown (after the callbacks', the module's and the
    datamodule's ``teardown`` and the loggers' ``finalize``); the ``SystemExit`` raised right after it goes through
    Lightning's interrupt path (``on_exception``, loggers finalized as "failed"), as Lightning's own SIGTERM
    handling does. With Lightning's subprocess launcher (``strategy="ddp"`` started from a script), global rank 0
    first waits for the other ranks to leave, so its child-process observer does not kill it for their exit code.
    """
    profiler = trainer.profiler
    original = profiler.describe

    def describe() -> None:
        profiler.__dict__.pop("describe", None)
        original()
        procs = getattr(trainer.strategy.launcher, "procs", None)
        if trainer.is_global_zero and isinstance(procs, list) and procs:
            children = list(procs)
            procs.clear()  # the observer thread polls this list; empty, it stops watching
            for p in children:
                try:
                    p.wait(timeout=120)
                except Exception:  # noqa: BLE001 - leave anyway
                    pass
        raise SystemExit(code)

    profiler.describe = describe


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


# --------------------------------------------------------------------------------- checks


def _plain_hparams(value: Any) -> Any:
    """An ``argparse.Namespace`` or dataclass instance (nested too) as its dict; everything else unchanged."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain_hparams(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_hparams(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain_hparams(v) for v in value)
    return value


_HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def _check_hparams(trainer: Any, pl_module: Any) -> None:
    """Raise now, before any step, if the hyperparameters cannot be stored without pickle."""
    sources = {"hyper_parameters": pl_module, "datamodule_hyper_parameters": getattr(trainer, "datamodule", None)}
    for key, owner in sources.items():
        hparams = getattr(owner, "hparams", None) if owner is not None else None
        if not hparams:
            continue
        try:
            TreeEncoder().encode(_plain_hparams(dict(hparams)), (STATE_NAME, key))
        except UnsupportedValueError as e:
            raise UnsupportedValueError(
                f"{e}. AutoCheckpoint stores the hyperparameters of save_hyperparameters() as JSON: leave this one "
                "out with save_hyperparameters(ignore=[...]) or store it as plain values (a dict); argparse "
                "Namespaces and dataclasses of plain values are stored as their dict"
            ) from None


def _check_shapes(ckpt: Mapping[str, Any], pl_module: Any, step: int, directory: str) -> None:
    """Raise ``StateMismatchError`` naming the parameters whose shapes differ, before anything is copied."""
    own = pl_module.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
           for k, v in ckpt["state_dict"].items()
           if k in own and hasattr(v, "shape") and hasattr(own[k], "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise StateMismatchError(
            f"the checkpoint of step {step} in {directory} does not fit this model; parameters with other shapes: "
            + "; ".join(bad) + ". Build the model as it was when the checkpoint was written, or use a new directory",
            mismatched=[b.split(":")[0] for b in bad],
        )


_NOT_RESUMABLE_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


# --------------------------------------------------------------------------------- the callback


class AutoCheckpoint(_Base):
    """Saves the full Lightning training state with autockpt, and resumes from it with no ``ckpt_path``.

    Args:
        directory: a local path or fsspec URL (``s3://bucket/run9``); one directory per run.
        every_n_train_steps: save when ``trainer.global_step`` is a multiple of this.
        train_time_interval: save when this much time (``datetime.timedelta`` or seconds) passed since the last save.
        every_n_epochs: save at the end of every N-th epoch (after its validation). The default when no trigger
            is given is ``every_n_epochs=1``. The last step of the run is always saved.
        max_to_keep: how many of the newest checkpoints to keep (``None``: all).
        keep_every_n_hours: also keep one checkpoint per N hours of the run, forever.
        monitor, mode, save_top_k: also keep the ``save_top_k`` best checkpoints by the logged metric ``monitor``
            (from ``trainer.callback_metrics``), lower is better with ``mode="min"``. A metric logged in
            validation is stored only with the checkpoint of the weights it was computed for.
        storage_options: passed to fsspec (credentials, endpoint URL, ...).
        local_dir: a fast local tier in front of ``directory`` (see ``CheckpointManager``); on preemption the
            final checkpoint's upload is awaited up to ``upload_deadline_s`` and the log line says if it is durable.
        dedup: tensors unchanged since a kept checkpoint (a frozen backbone) are not written again (see
            ``CheckpointManager``); ``False`` writes self-contained checkpoints.
        preemption_signals: signals that mean "save and stop"; ``None`` turns it off.
        exit_on_preemption: after a signal stopped training and its checkpoint is committed, leave the process
            with exit code ``128 + signal`` (143 for SIGTERM) once ``fit``'s teardown is done, so that schedulers
            requeue the job and code after ``fit`` does not run on a half-trained model. ``False`` (notebooks):
            ``fit`` returns; check ``preempted``/``exit_code``.
        cloud_notices: on AWS, GCP or Azure, also watch the instance metadata for a spot/preemption notice
            and treat it as SIGTERM (see ``autockpt.cloud_notice``); ``False`` turns that off.

    After ``fit``: ``restored_step`` is the step it resumed from (``None`` for a fresh start), ``preempted`` says
    whether a signal stopped the run (the checkpoint was written; run the same ``fit`` again to continue) and
    ``exit_code`` is 0 or ``128 + signal``.

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
        exit_on_preemption: bool = True,
        local_dir: str | os.PathLike[str] | None = None,
        cloud_notices: bool = True,
        dedup: bool = True,
    ) -> None:
        super().__init__()
        check_directory(directory)
        check_positive("every_n_train_steps", every_n_train_steps, int)
        check_positive("every_n_epochs", every_n_epochs, int)
        if isinstance(train_time_interval, datetime.timedelta):
            train_time_interval = train_time_interval.total_seconds()
            if train_time_interval <= 0:
                raise InvalidArgumentError("train_time_interval must be a positive timedelta or number of seconds")
        check_positive("train_time_interval", train_time_interval, float)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise InvalidArgumentError(f"monitor must be a metric name (str) or None, got {monitor!r}")
        if monitor is None and (save_top_k != 1 or mode != "min"):
            raise InvalidArgumentError("mode and save_top_k need monitor='<logged metric name>' to rank checkpoints by")
        check_bool("exit_on_preemption", exit_on_preemption)
        keep_best = KeepBest(monitor, mode=mode, k=save_top_k) if monitor is not None else None  # type: ignore[arg-type]
        # the options shared with the manager, checked by the manager's own checkers (the same error texts)
        self._policy = ManagerOptions(max_to_keep, keep_every_n_hours, keep_best,
                                      storage_options=storage_options).policy
        if every_n_train_steps is None and train_time_interval is None and every_n_epochs is None:
            every_n_epochs = 1
        self.directory = os.fspath(directory)
        self.every_n_train_steps = every_n_train_steps
        self.train_time_interval = train_time_interval
        self.every_n_epochs = every_n_epochs
        self.monitor = monitor
        self.storage_options = dict(storage_options or {})
        self.local_dir = local_dir
        self.exit_on_preemption = exit_on_preemption
        check_bool("dedup", dedup)
        self.dedup = dedup
        self._watcher = (_Watcher(preemption_signals, cloud_notices=cloud_notices)
                         if preemption_signals is not None else None)
        self.restored_step: int | None = None
        self.preempted = False
        self.signal: int | None = None
        self._manager: CheckpointManager | None = None
        self._seed: int | None = None
        self._samplers: list[_SeededEpochSampler] = []
        self._pending: dict[str, Any] | None = None
        self._batches_done = 0
        self._last_saved_step: int | None = None
        self._start_step = 0
        self._last_save_time = time.monotonic()
        self._epoch_end_due = False
        self._stopped_early = False
        self._val_step: int | None = None  # global step at which validation last logged ``monitor``
        self._quiet: Any = None
        self._stop_at_start = 0
        self._rngs: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return str(self._generate_state_key(directory=self.directory))

    @property
    def exit_code(self) -> int:
        """0 unless a signal stopped the run; then ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1)."""
        return 128 + int(self.signal) if self.preempted and self.signal else 0

    # ------------------------------------------------------------------ resume
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.preempted = False
        self.signal = None
        self.restored_step = None
        self._stopped_early = False
        self._epoch_end_due = False
        self._val_step = None
        if self._watcher is not None:  # from here on, a signal (even during the restore) is a flag
            self._watcher.received = None
            self._watcher.install()
        _check_hparams(trainer, pl_module)
        if trainer.is_global_zero:
            # only global rank 0 has a manager; this callback agrees with the other ranks itself
            self._manager = CheckpointManager(self.directory, self._policy.max_to_keep,
                                              self._policy.keep_every_n_hours, self._policy.keep_best,
                                              storage_options=self.storage_options, distributed=False,
                                              local_dir=self.local_dir, dedup=self.dedup)
            try:  # a second writer fails here, before restoring and training, on every rank
                self._manager.acquire()
                problem = None
            except (LeaseError, StorageAccessError) as e:
                problem = (type(e).__name__, str(e))
            step = self._manager.latest_step if problem is None else None
        else:
            step = problem = None
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem is not None:
            raise (LeaseError if problem[0] == "LeaseError" else StorageAccessError)(problem[1])
        step = trainer.strategy.broadcast(step, src=0)
        self._last_saved_step = step
        self._start_step = step or 0
        self._last_save_time = time.monotonic()
        if step is None:
            return
        try:
            state = load(self.directory, step, storage_options=self.storage_options, local_dir=self.local_dir)
        except CheckpointNotFoundError:  # pragma: no cover - rank 0 just saw it
            raise
        ckpt = state.get(STATE_NAME)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
            raise StateMismatchError(
                f"the checkpoint of step {step} in {self.directory} was not written by "
                "autockpt.integrations.lightning.AutoCheckpoint (no Lightning checkpoint under 'lightning'); "
                "use an empty directory for this run"
            )
        _check_shapes(ckpt, pl_module, step, self.directory)
        _inject_lightning_checkpoint(trainer, ckpt)
        self.restored_step = step
        log.info("autockpt: resumed from step %d of %s", step, self.directory)

    def state_dict(self) -> dict[str, Any]:
        sampler = self._samplers[0] if len(self._samplers) == 1 else None
        return {
            "seed": self._seed,
            "epoch": sampler.epoch if sampler is not None else None,
            "batches_done": self._batches_done,
            "gen_epoch": sampler.gen_epoch if sampler is not None else None,
            "gen_state": sampler.gen_state if sampler is not None else None,
            "rng": RNGState().state_dict(),  # this rank's (rank 0's in the checkpoint), as before
            "rngs": self._rngs,  # under DDP: every rank's, in rank order (gathered by _save)
            "stopped_early": self._stopped_early,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
        if state_dict.get("seed") is not None:
            self._seed = int(state_dict["seed"])

    def _take_over_signals(self, trainer: Any) -> None:
        if self._watcher is not None:
            self._watcher.take_over()
            if self._watcher.triggered:
                _clear_lightning_sigterm(trainer)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._take_over_signals(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        import torch

        self._take_over_signals(trainer)
        # a signal during the restore or the sanity check: stop before the first step (at its batch start)
        self._stop_at_start = self._agree(trainer)
        if self._seed is None:
            self._seed = int(torch.empty((), dtype=torch.int64).random_().item())
            if trainer.world_size > 1:  # rank 0's on every rank, as a resume will have it (ranks may seed apart)
                self._seed = int(trainer.strategy.broadcast(self._seed, src=0))
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
                if getattr(dl, "generator", None) is None:
                    # starting an epoch's iterator then draws its worker base seed from this generator, not from
                    # the global RNG, so the global RNG at an epoch's first batch is the one saved at its start
                    dl.generator = torch.Generator().manual_seed(self._seed)
            else:
                unwrappable.append(dl)
        pending = self._pending
        if pending is not None and pending.get("stopped_early"):
            trainer.should_stop = True  # the run was finished by should_stop (EarlyStopping, ...): train nothing
            log.info("autockpt: the run in %s finished at step %s (trainer.should_stop); nothing to train",
                     self.directory, self.restored_step)
        if pending is None or pending.get("epoch") is None:
            if pending is not None and pending.get("batches_done") and (unwrappable or len(self._samplers) > 1):
                self._warn_inexact()
            return
        if len(self._samplers) == 1 and not unwrappable:
            s = self._samplers[0]
            s.resume_at = (int(pending["epoch"]), int(pending["batches_done"]))
            if pending.get("gen_epoch") is not None:
                s.gen_epoch, s.gen_state = int(pending["gen_epoch"]), pending["gen_state"]
            # autockpt positions the data: Lightning's "dataloader is not resumable" warning does not apply
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING)
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

    def _unquiet(self) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._unquiet()
        if self._stop_at_start:
            self._preempted(trainer, self._stop_at_start)
            raise StopIteration  # nothing trained since the newest checkpoint; nothing to save
        if self._pending is not None:
            pending, self._pending = self._pending, None
            rng, rngs = pending.get("rng"), pending.get("rngs")
            saved = len(rngs) if isinstance(rngs, list) and rngs else 1  # processes that saved
            if isinstance(rngs, list) and rngs:  # every rank's saved: this rank takes its own
                rng = rngs[trainer.global_rank % saved]
            if rng is not None:
                RNGState().load_state_dict(rng)
            # (a checkpoint without "rngs" predates per-rank RNGs: rank 0's goes to every rank, as it did then)
            if "rngs" in pending and saved != trainer.world_size:
                self._inexact_rngs(trainer, saved, trainer.world_size)

    def _inexact_rngs(self, trainer: Any, saved: int, world: int) -> None:
        """Resumed on another number of processes: new ranks get RNGs of their own; say why it is not exact."""
        rank = int(trainer.global_rank)
        if rank >= saved:
            RNGState().derive_for_rank(rank)  # ranks with no saved RNG: a stream of their own, deterministically
        if trainer.is_global_zero:
            log.warning("autockpt: step %s of %s was saved by %d process(es) and is restored on %d, so this resume "
                        "cannot be bit-exact: ranks without a saved RNG of their own derive it deterministically "
                        "from a saved rank's, and the batches each rank gets differ from an uninterrupted run",
                        self.restored_step, self.directory, saved, world)

    @staticmethod
    def _every_rank_rng(trainer: Any) -> list[dict[str, Any]] | None:
        """Every rank's RNG state in rank order, on every rank (collective); None in a single process."""
        if trainer.world_size <= 1:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):  # pragma: no cover - DDP always has one
            return None
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, RNGState().state_dict())
        return out

    # ------------------------------------------------------------------ preemption
    def _agree(self, trainer: Any) -> int:
        """The signal any rank received (0: none); every rank calls this at the same point."""
        sig = self._watcher.received if self._watcher is not None and self._watcher.received else 0
        if trainer.world_size > 1:
            import torch

            t = torch.tensor(float(sig), device=trainer.strategy.root_device)
            sig = int(trainer.strategy.reduce(t, reduce_op="max").item())
        return sig

    def _preempted(self, trainer: Any, sig: int) -> None:
        """Record the stop and log the convention's line; the newest completed step is committed."""
        self.preempted = True
        self.signal = sig
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        step = int(trainer.global_step)
        if step == self._start_step or self._last_saved_step is None:
            where = (f"no step completed since step {self._last_saved_step} (the newest checkpoint in "
                     f"{self.directory})" if self._last_saved_step is not None
                     else f"no step completed and there is no checkpoint in {self.directory}")
        else:
            durable = (self._manager.durability(self._last_saved_step) if self._manager is not None
                       else self.directory)
            where = f"saved step {self._last_saved_step} to {durable}"
        if trainer.is_global_zero:
            log.warning("autockpt: %s: %s; stopping (exit code %d)", name, where, self.exit_code)

    # ------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches_done = batch_idx + 1
        step = int(trainer.global_step)
        strategy = trainer.strategy
        last_batch = self._batches_done >= trainer.num_training_batches
        if step == self._last_saved_step or step == 0:
            due = False
        else:
            due = self.every_n_train_steps is not None and step % self.every_n_train_steps == 0
            if self.every_n_epochs is not None and last_batch:
                due = due or (trainer.current_epoch + 1) % self.every_n_epochs == 0
            if self.train_time_interval is not None:
                timed = time.monotonic() - self._last_save_time >= self.train_time_interval
                due = due or bool(strategy.broadcast(timed, src=0) if trainer.world_size > 1 else timed)
        if last_batch:
            # the epoch's validation and on_train_epoch_end belong to this step: save at the epoch boundary
            self._epoch_end_due = self._epoch_end_due or due
            return
        if due:
            self._save(trainer, step)
        sig = self._agree(trainer)  # after the save: a signal during it counts too
        if sig:
            if step != self._last_saved_step:
                self._save(trainer, step)
            self._preempted(trainer, sig)
            raise StopIteration  # ends the epoch here: no validation, no epoch end for the partial epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._batches_done = 0
        step = int(trainer.global_step)
        sig = self._agree(trainer)
        if step != self._last_saved_step and step != 0 and (self._epoch_end_due or sig):
            self._save(trainer, step, between_epochs=True)
        self._epoch_end_due = False
        if sig:
            self._preempted(trainer, sig)
            raise StopIteration  # ends fit here, before the epoch starts

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.preempted:
            raise StopIteration  # the partial epoch: skip the module's and the monitoring callbacks' epoch end

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and self.monitor is not None and self.monitor in trainer.callback_metrics:
            self._val_step = int(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._unquiet()
        if self.preempted:
            return
        step = int(trainer.global_step)
        sig = self._agree(trainer)
        self._stopped_early = bool(trainer.should_stop)
        if step != self._last_saved_step and step != 0:
            self._save(trainer, step)  # the last step is always saved, whatever ended fit
        if sig:
            self._preempted(trainer, sig)

    def _save(self, trainer: Any, step: int, between_epochs: bool = False) -> None:
        self._rngs = self._every_rank_rng(trainer)
        ckpt = _dump_lightning_checkpoint(trainer)
        self._rngs = None
        if between_epochs:
            _as_between_epochs(ckpt)
        for key in _HPARAM_KEYS:
            if key in ckpt:
                ckpt[key] = _plain_hparams(dict(ckpt[key]))
        error: BaseException | None = None
        if trainer.is_global_zero:
            assert self._manager is not None
            metrics = {}
            if self.monitor is not None and self.monitor in trainer.callback_metrics:
                # a validation metric belongs to the weights validated; a training metric to this step
                if self._val_step is None or self._val_step == step:
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

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._unquiet()
        if not (isinstance(exception, SystemExit) and self.preempted):
            self._stop_watching()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._unquiet()
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        late = self._watcher.received if self._watcher is not None else None
        if late and not self.preempted:  # a signal after the end of training: everything is saved
            self._preempted(trainer, late)
        if self.preempted and self.exit_on_preemption:
            _exit_after_teardown(trainer, self.exit_code)  # handlers stay: a second signal cannot kill the exit
        else:
            self._stop_watching()


class _Watcher(PreemptionWatcher):
    def take_over(self) -> None:
        """Put this handler back on top of the one Lightning installed after it (it raises SIGTERMException)."""
        if self._installed:
            for s in self.signals:
                signal.signal(s, self._handle)


__all__ = ["AutoCheckpoint", "SUPPORTED_LIGHTNING"]

"""Keras 3: ``AutoCheckpoint``, a ``model.fit`` callback that resumes exactly, mid-epoch included.

```python
from autockpt.integrations.keras import AutoCheckpoint
model.fit(x, y, epochs=20, callbacks=[AutoCheckpoint("s3://bucket/run3", save_freq=200, max_to_keep=3)])
```

Run the same line again after the process died and training continues where it stopped. Works with any
Keras backend (tested with TensorFlow and torch); storage goes through fsspec, so remote URLs need no
TensorFlow.

One job: the Keras callback. Imports keras and ``autockpt.errors``, ``format``, ``manager``, ``options``,
``preemption``, ``retention``, ``rng`` and ``autockpt.integrations._keras_internals``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np

from autockpt.errors import InvalidArgumentError, StateMismatchError
from autockpt.format import is_stateful, is_tensor, is_torch_tensor
from autockpt.integrations import _keras_internals as internals
from autockpt.manager import CheckpointManager
from autockpt.options import check_bool, check_directory, check_positive
from autockpt.preemption import PreemptionWatcher
from autockpt.retention import KeepBest
from autockpt.rng import RNGState

log = logging.getLogger("autockpt")

__all__ = ["AutoCheckpoint", "KerasRNGState", "VariablesState", "keras_state"]

# Attributes of Keras' own callbacks that decide their future behaviour (the best value seen, patience).
_CALLBACK_ATTRS: dict[str, tuple[str, ...]] = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_weights", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best", "_batches_seen_since_last_saving", "_last_batch_seen"),
    "History": ("epoch", "history"),  # so that model.history after a resume holds the earlier epochs too
}


def _np(v: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(v))


def _value(v: Any) -> Any:
    """A variable's value for the checkpoint: on the torch backend its own memory (no copy: a save snapshots
    it, a restore reads straight into it), elsewhere a NumPy copy."""
    own = internals.variable_storage(v)
    return _np(v) if own is None else own


def _dtype_name(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.")


class VariablesState:
    """A list of Keras variables as a stateful object: ``state_dict()`` gives their values keyed by position.

    On the torch backend the values are the variables' own tensors (no copy: a save snapshots them and a
    restore reads into them); on other backends they are NumPy copies.

    ``load_state_dict`` checks every key, shape and dtype before assigning anything, and raises
    ``StateMismatchError`` (leaving every variable untouched) if the checkpoint does not fit.

    ```python
    state = VariablesState(model.weights)
    saved = state.state_dict()            # {"0000": array, "0001": array, ...}
    state.load_state_dict(saved)          # variable.assign(...) for each
    ```
    """

    def __init__(self, variables: Sequence[Any], name: str = "variables") -> None:
        self.variables = list(variables)
        self.name = name

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"{i:04d}": _value(v) for i, v in enumerate(self.variables)}

    def describe_key(self, key: str) -> str | None:
        """The path of the variable stored under ``key`` (``"0000"`` -> ``"dense/kernel"``), for messages."""
        i = int(key) if key.isdigit() else -1
        return str(self.variables[i].path) if 0 <= i < len(self.variables) else None

    def _check(self, state: dict[str, Any]) -> list[Any]:
        keys = [f"{i:04d}" for i in range(len(self.variables))]
        if sorted(state) != keys:
            raise StateMismatchError(
                f"{self.name}: the checkpoint has {len(state)} variables, the model {len(keys)}; nothing was "
                "restored. Build the model (and optimizer) with the same code as the run that saved it."
            )
        out, bad = [], []
        for key, var in zip(keys, self.variables, strict=True):
            value = state[key] if is_tensor(state[key]) else np.asarray(state[key])
            want = (tuple(int(d) for d in var.shape), keras.backend.standardize_dtype(var.dtype))
            got = (tuple(int(d) for d in value.shape), _dtype_name(value))
            if got != want:
                bad.append(f"{key} {var.path} (model {want[1]}{list(want[0])}, checkpoint {got[1]}{list(got[0])})")
            out.append(value)
        if bad:
            raise StateMismatchError(f"{self.name}: variables do not match; nothing was restored: "
                                     + "; ".join(bad), mismatched=bad)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = self._check(state)
        for var, value in zip(self.variables, values, strict=True):
            own = internals.variable_storage(var)
            if own is not None and is_torch_tensor(value) and value.data_ptr() == own.data_ptr():
                continue  # the restore read it into the variable's own memory
            var.assign(value)


class _MetricsState:
    """Running metric accumulators (the mean loss so far in the epoch), kept as plain numbers.

    Plain values, so a fresh model whose compile metrics are not built yet still takes the checkpoint; the
    callback applies them (checked) when it resumes mid-epoch, after Keras resets the metrics.
    """

    def __init__(self, model: Any, strict: bool = False) -> None:
        self.model = model
        self.strict = strict
        self.pending: list[Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        vals = [_np(v) for v in self.model.metrics_variables]
        return {"values": [v.tolist() for v in vals], "dtypes": [str(v.dtype) for v in vals]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [np.asarray(v, dtype=d) for v, d in zip(state["values"], state["dtypes"], strict=True)]
        if self.strict:  # restored first, so a mismatch raises before anything is assigned
            VariablesState(self.model.metrics_variables, "metrics")._check(self._as_dict(self.pending))

    @staticmethod
    def _as_dict(values: list[Any]) -> dict[str, Any]:
        return {f"{i:04d}": v for i, v in enumerate(values)}

    def apply(self) -> None:
        values, self.pending = self.pending, None
        if values is None:
            return
        VariablesState(self.model.metrics_variables, "metrics").load_state_dict(self._as_dict(values))


class KerasRNGState:
    """Python's, NumPy's and torch's global RNGs (``autockpt.RNGState``) plus Keras' global seed generator.

    ```python
    rng = KerasRNGState()
    saved = rng.state_dict()
    rng.load_state_dict(saved)
    ```
    """

    loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator

        gen = global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
        keras_state = None if gen is None else [int(x) for x in _np(gen.state).ravel()]
        return {"global": RNGState().state_dict(), "keras": keras_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator

        self.loaded = state
        RNGState().load_state_dict(state["global"])
        if state["keras"] is None:
            global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
        else:
            st = seed_generator.global_seed_generator().state
            st.assign(np.asarray(state["keras"], dtype=keras.backend.standardize_dtype(st.dtype)).reshape(st.shape))


class _Stash:
    """A plain-valued state the callback applies itself, at the right moment."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.value

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def _plain(v: Any) -> Any:
    """A callback attribute or a logged value as plain values and NumPy arrays (what a checkpoint holds)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):  # e.g. History.history: {"loss": [0.3, 0.2], ...}
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):  # e.g. EarlyStopping.best_weights (arrays), History.epoch (ints)
        return [x if x is None or isinstance(x, (bool, int, float, str)) else
                x.item() if isinstance(x, np.generic) else _np(x) for x in v]
    arr = _np(v)
    return arr.item() if arr.ndim == 0 else arr


def _callback_states(callbacks: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for cb in callbacks:
        cls = type(cb).__name__
        if is_stateful(cb):
            state = cb.state_dict()
        elif cls in _CALLBACK_ATTRS:
            state = {a: _plain(getattr(cb, a)) for a in _CALLBACK_ATTRS[cls] if hasattr(cb, a)}
        else:
            continue
        key = f"{cls}_{counts.get(cls, 0)}"
        counts[cls] = counts.get(cls, 0) + 1
        out[key] = state
    return out


def _restore_callbacks(callbacks: Iterable[Any], saved: dict[str, Any]) -> None:
    counts: dict[str, int] = {}
    seen = set()
    for cb in callbacks:
        cls = type(cb).__name__
        stateful = is_stateful(cb)
        if not stateful and cls not in _CALLBACK_ATTRS:
            continue
        key = f"{cls}_{counts.get(cls, 0)}"
        counts[cls] = counts.get(cls, 0) + 1
        if key not in saved:
            log.warning("autockpt: the checkpoint has no state for callback %s; it starts afresh", key)
            continue
        seen.add(key)
        if stateful:
            cb.load_state_dict(saved[key])
        else:
            for attr, value in saved[key].items():
                setattr(cb, attr, value)
    for key in set(saved) - seen:
        log.warning("autockpt: the checkpoint holds state for callback %s, which this fit does not have", key)


def keras_state(model: Any, _strict: bool = False) -> dict[str, Any]:
    """The state ``AutoCheckpoint`` saves, for use with a plain ``CheckpointManager``.

    The model must be built and compiled with its optimizer; the optimizer is built here if it is not.
    ``restore`` fills the model's variables (weights and seed generators), the optimizer's (iterations,
    moments, learning rate) and the global RNGs; ``state["progress"].loaded`` then holds the saved epoch
    and batch position.

    ```python
    import autockpt
    from autockpt.integrations.keras import keras_state
    model = build_model()                      # the same code as the run that saved
    step = autockpt.CheckpointManager("runs/keras1").restore(keras_state(model))
    ```
    """
    opt = getattr(model, "optimizer", None)
    if opt is None:
        raise InvalidArgumentError("the model has no optimizer: call model.compile(optimizer=..., loss=...) first")
    if not opt.built:
        opt.build(model.trainable_variables)
    return {
        "metrics": _MetricsState(model, _strict),
        "model": VariablesState(model.variables, "model"),
        "optimizer": VariablesState(opt.variables, "optimizer"),
        "rng": KerasRNGState(),
        "progress": _Stash({}),
        "callbacks": _Stash({}),
    }


_KEY = re.compile(r"^(model|optimizer)/(\d+)\b")


def _name_variables(error: StateMismatchError) -> StateMismatchError:
    """``error`` restated for a Keras user, with what to do; its keys already name each variable by its path
    (``model/0003 dense/kernel``: ``VariablesState.describe_key``).

    Keys stay numbered on storage: Keras' auto-generated paths (``dense_1``) change with what else the
    process built, so they cannot identify a variable across processes, but they name it for a person.
    """
    lists = {what: list(getattr(error, what)) for what in ("missing", "unexpected", "mismatched")}
    if not any(_KEY.match(e) for keys in lists.values() for e in keys):  # nothing numbered (the metrics' check)
        return error
    parts = [f"{what}: {', '.join(keys[:20])}" + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
             for what, keys in lists.items() if keys]
    message = ("the checkpoint does not fit this model; nothing was restored. " + "; ".join(parts) + ". Build "
               "the model and optimizer with the same code as the run that saved it, or use a new directory.")
    return StateMismatchError(message, **lists)


def _mode_for(monitor: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "max" if any(s in monitor for s in ("acc", "auc", "precision", "recall", "f1")) else "min"


class AutoCheckpoint(keras.callbacks.Callback):
    """Checkpoints ``model.fit`` so that running the same ``fit`` again after a crash resumes exactly.

    Args:
        directory: local path or fsspec URL (``s3://bucket/run3``, ``gs://...``, ``memory://...``).
        save_freq: ``"epoch"`` (at each epoch end) or an int: every that many batches.
        save_every_seconds: also save at the first batch end after this many seconds.
        max_to_keep, keep_every_n_hours: retention, as in ``CheckpointManager``.
        monitor: a logged metric (e.g. ``"val_loss"``); the ``keep_best`` best checkpoints by it are kept too.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy-like names, else min).
        keep_best: how many best checkpoints to keep when ``monitor`` is set.
        async_save: write in a background thread (see ``CheckpointManager``).
        storage_options: passed to fsspec.
        local_dir: a fast local tier in front of ``directory`` (see ``CheckpointManager``); on preemption the
            final checkpoint's upload is awaited up to ``upload_deadline_s`` and the log line says if it is durable.
        dedup: tensors unchanged since a kept checkpoint are not written again (see ``CheckpointManager``);
            ``False`` writes self-contained checkpoints.
        signals: signals that save the newest completed batch and stop training (SIGTERM, SIGUSR1).
        exit_on_preemption: after such a signal stopped training and its checkpoint is committed, leave the
            process with ``SystemExit(128 + signal)`` (143 for SIGTERM) once ``fit`` has finished its
            teardown, so that a scheduler requeues the job and code after ``fit`` does not run on a
            half-trained model. ``False`` (notebooks) lets ``fit`` return; ``preempted`` and ``exit_code``
            tell what happened either way.
        cloud_notices: on AWS, GCP or Azure, also watch the instance metadata for a spot/preemption notice
            and treat it as SIGTERM (see ``autockpt.cloud_notice``); ``False`` turns that off.

    Restores, at the start of ``fit``: model variables (weights, seed generators), optimizer variables
    (iterations, so learning-rate schedules continue; moments), the epoch and the batch inside it, the
    running metrics, Python/NumPy/torch/Keras RNGs, ``model.history`` (the epochs of earlier processes), and
    the state of ``EarlyStopping``, ``ReduceLROnPlateau``, ``ModelCheckpoint`` and any callback with
    ``state_dict()``/``load_state_dict()``. Checkpoints are taken after every callback's hook ran, so the
    order of ``callbacks=`` does not matter. A run that a callback stopped (``EarlyStopping``) is finished:
    running it again trains nothing. A mid-epoch resume replays the epoch's shuffle and skips the batches
    already trained on without training on them (for NumPy arrays on the torch backend, without even
    reading them); NumPy arrays and ``PyDataset``\\s need no wrapper; on the TensorFlow backend
    a ``tf.data`` pipeline with seeded shuffles is replayed too (the iterators ``fit`` had made of it, then
    the epoch's first batches). Python generators are skipped by drawing
    their first batches, so they must be deterministic.

    ```python
    import keras, numpy as np
    from autockpt.integrations.keras import AutoCheckpoint
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.random.rand(256, 4), np.random.rand(256, 1)
    model.fit(x, y, epochs=3, batch_size=16,
              callbacks=[AutoCheckpoint("/tmp/keras_demo", save_freq=5, max_to_keep=2)])
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        save_freq: str | int = "epoch",
        save_every_seconds: float | None = None,
        max_to_keep: int | None = 5,
        keep_every_n_hours: float | None = None,
        monitor: str | None = None,
        mode: str = "auto",
        keep_best: int = 1,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        signals: Iterable[int | str] = (signal.SIGTERM, signal.SIGUSR1),
        exit_on_preemption: bool = True,
        local_dir: str | os.PathLike[str] | None = None,
        cloud_notices: bool = True,
        dedup: bool = True,
    ) -> None:
        super().__init__()
        check_directory(directory)
        check_positive("save_every_seconds", save_every_seconds, float)  # passed on as save_interval_seconds
        if not (save_freq == "epoch" or (isinstance(save_freq, int) and not isinstance(save_freq, bool)
                                         and save_freq > 0)):
            raise InvalidArgumentError(f"save_freq must be 'epoch' or a positive int (batches), got {save_freq!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise InvalidArgumentError(f"monitor must be a metric name such as 'val_loss' or None, got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise InvalidArgumentError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        check_bool("exit_on_preemption", exit_on_preemption)
        best = KeepBest(monitor, _mode_for(monitor, mode), keep_best) if monitor is not None else None  # type: ignore[arg-type]
        self.save_freq = save_freq
        self.monitor = monitor
        self.exit_on_preemption = exit_on_preemption
        self.watcher = PreemptionWatcher(signals, cloud_notices=cloud_notices)
        self.cloud_notices = cloud_notices
        self.manager = CheckpointManager(
            directory, max_to_keep=max_to_keep, keep_every_n_hours=keep_every_n_hours, keep_best=best,
            save_interval_seconds=save_every_seconds, async_save=async_save, storage_options=storage_options,
            local_dir=local_dir,
            dedup=dedup,
        )
        self.save_every_seconds = save_every_seconds
        self.restored_step: int | None = None
        self.preempted = False
        self._reset_run()

    @property
    def exit_code(self) -> int:
        """0 unless a signal stopped the last ``fit``; then ``128 + signal number`` (143 for SIGTERM)."""
        sig = self.watcher.received
        return 128 + int(sig) if self.preempted and sig is not None else 0

    def _reset_run(self) -> None:
        self._epoch = 0
        self._batch = 0  # batches done in the current epoch
        self._global = 0  # batches done in the whole run
        self._finished = False  # a callback ended the run at an epoch end
        self._epoch_rng: dict[str, Any] | None = None
        self._count_iterators: Any = None  # TensorFlow: how many iterators fit made of its dataset so far
        self._epoch_iterators: int | None = None  # ... before the current epoch's
        self._resume: dict[str, Any] | None = None
        self._fit: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None
        self._stopped_mid_epoch = False
        self._preempted_mid_epoch = False
        self._due_at_epoch_end = False
        self._restart_epoch = False
        self._stopping = False
        self._ending = False
        self._undo_hooks: Any = None
        self._saved: tuple[int, int, int, bool] = (0, 0, 0, False)  # the progress the newest checkpoint holds
        self._newest: int | None = None  # the newest checkpoint's step

    # ---------------------------------------------------------------- state
    def _progress(self) -> tuple[int, int, int, bool]:
        return (self._global, self._epoch, self._batch, self._finished)

    def _callbacks(self) -> list[Any]:
        if self._fit is None or self._fit.get("callbacks") is None:
            return []
        return [cb for cb in getattr(self._fit["callbacks"], "callbacks", []) if cb is not self]

    def _save(self, logs: dict[str, Any] | None) -> bool:
        assert self._state is not None
        internals.sync_backend_state(self.model)
        self._state["progress"].value = {
            "epoch": self._epoch, "batch": self._batch, "global_batch": self._global,
            "epoch_rng": self._epoch_rng, "finished": self._finished, "iterators": self._epoch_iterators,
        }
        self._state["callbacks"].value = _callback_states(self._callbacks())
        metrics = {}
        for k, v in (logs or {}).items():
            v = _plain(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[k] = v
        saved = self.manager.save(self._global, self._state, metrics=metrics, force=True,
                                  metadata={"epoch": self._epoch, "batch": self._batch})
        if saved:
            self._saved, self._newest = self._progress(), self._global
        return saved

    def _stop_for_signal(self, logs: dict[str, Any] | None) -> None:
        """A watched signal arrived: save the newest completed step if it is not saved, stop, say which."""
        if self._stopping:
            return
        self._stopping = True
        self.preempted = True
        self.model.stop_training = True
        where = self.manager.directory
        name = signal.Signals(self.watcher.received).name if self.watcher.received else "signal"
        foreign_stop = self._stopped_mid_epoch and not self._preempted_mid_epoch
        saved = self._progress() != self._saved and not foreign_stop and self._save(logs)
        durable = self.manager.durability(self._global)  # with local_dir: its upload, up to upload_deadline_s
        newest = "none" if self._newest is None else f"step {self._newest}"
        if saved:
            log.warning("autockpt: %s: saved step %d to %s; stopping (exit code %d)", name, self._global, durable,
                        self.exit_code)
        elif self._progress() == self._saved and self._newest is None:
            log.warning("autockpt: %s: no step completed and %s holds no checkpoint; stopping (exit code %d)",
                        name, where, self.exit_code)
        elif self._progress() == self._saved:
            log.warning("autockpt: %s: no step completed since step %d (the newest checkpoint in %s); stopping "
                        "(exit code %d)", name, self._newest, where, self.exit_code)
        else:  # another callback stopped mid-epoch, or the save failed (it warned why)
            log.warning("autockpt: %s: step %d is not saved; the newest checkpoint in %s: %s; stopping "
                        "(exit code %d)", name, self._global, where, newest, self.exit_code)

    def _restore(self) -> None:
        assert self._state is not None
        self.manager.acquire()  # a second writer fails here, before restoring and training
        try:
            self.restored_step = self.manager.restore(self._state)
        except StateMismatchError as e:
            raise _name_variables(e) from None
        where = self.manager.directory
        if self.restored_step is None:
            log.info("autockpt: no checkpoint in %s; starting fresh", where)
            return
        prog = self._state["progress"].loaded
        self._resume = {"progress": prog, "callbacks": self._state["callbacks"].loaded}
        self._epoch, self._batch, self._global = prog["epoch"], prog["batch"], prog["global_batch"]
        self._finished = bool(prog.get("finished", False))
        self._saved, self._newest = self._progress(), self.restored_step
        epochs = self.params.get("epochs") if self.params else None
        if self._finished:
            log.info("autockpt: resumed from step %d of %s: the run finished (a callback stopped it after epoch "
                     "%d); nothing to train", self.restored_step, where, self._epoch)
            internals.set_initial_epoch(self.model, max(self._epoch, epochs or 0) or 2**62)
            return
        iterator = None if self._fit is None else self._fit.get("epoch_iterator")
        if self._batch > 0 and iterator is None:
            log.warning(
                "autockpt: cannot resume epoch %d at batch %d here (this fit does not expose its data "
                "iterator); the epoch restarts from its first batch, so %d batches are trained on twice. "
                "Use save_freq='epoch' to avoid this.", self._epoch, self._batch, self._batch)
            self._global -= self._batch
            self._batch = 0
            self._restart_epoch = True
            self._saved = self._progress()  # nothing new to save before a batch completes
        elif self._batch > 0:
            caveat = internals.mid_epoch_caveat(iterator)
            if caveat is not None:
                log.warning(
                    "autockpt: resuming epoch %d at batch %d may not see the same data as an uninterrupted "
                    "run: %s. For an exact resume pass NumPy arrays, a keras.utils.PyDataset or (TensorFlow "
                    "backend) a seeded tf.data pipeline, without steps_per_epoch, or use save_freq='epoch'.",
                    self._epoch, self._batch, caveat)
        if iterator is not None and self._count_iterators is not None:  # TensorFlow: the epoch's tf.data order
            internals.replay_iterators(iterator, int(prog.get("iterators") or 0))
        internals.set_initial_epoch(self.model, self._epoch)
        log.info("autockpt: resumed from step %d of %s (epoch %d, batch %d)", self.restored_step, where,
                 self._epoch, self._batch)

    def _restore_callbacks(self) -> None:
        resume, self._resume = self._resume, None
        if resume is not None:
            _restore_callbacks(self._callbacks(), resume["callbacks"] or {})

    # ---------------------------------------------------------------- hooks
    # With fit's CallbackList found, autockpt acts around the hooks of all callbacks (before every
    # on_epoch_begin, after every on_train_batch_end/on_epoch_end/on_train_end); its own hooks then do
    # nothing. Without it (an unknown trainer), its own hooks act, and their place in callbacks= matters.
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._reset_run()
        self.preempted = False
        internals.set_initial_epoch(self.model, None)  # nothing left from a fit that raised
        internals.skip_validation(self.model, False)
        # first: a signal in the restore counts
        self.watcher = PreemptionWatcher(self.watcher.signals, cloud_notices=self.cloud_notices).install()
        try:
            self._fit = internals.find_fit_locals(self.model)
            if self._fit is not None and self._fit.get("epoch_iterator") is not None:
                internals.build_compile_state(self.model, self._fit["epoch_iterator"])
                self._count_iterators = internals.count_iterators(self._fit["epoch_iterator"])
            self._state = keras_state(self.model, _strict=True)
            self._restore()
        except BaseException:
            self.watcher.uninstall()
            internals.set_initial_epoch(self.model, None)
            raise
        callback_list = None if self._fit is None else self._fit.get("callbacks")
        if callback_list is not None:
            self._undo_hooks = internals.intercept(callback_list, {
                "on_epoch_begin": self._around_epoch_begin, "on_train_batch_end": self._around_batch_end,
                "on_epoch_end": self._around_epoch_end, "on_train_end": self._around_train_end,
            })
        else:
            log.warning("autockpt: cannot find this fit's callback list; put AutoCheckpoint last in callbacks= "
                        "so that it saves the other callbacks' state after their hooks ran")
        if self.watcher.triggered:  # during the restore: train nothing
            epochs = self.params.get("epochs") if self.params else None
            internals.set_initial_epoch(self.model, max(self._epoch, epochs or 0) or 2**62)
            self._stop_for_signal(logs)

    def _around_epoch_begin(self, original: Any, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._before_epoch(epoch)
        original(epoch, logs)

    def _around_batch_end(self, original: Any, batch: int, logs: dict[str, Any] | None = None) -> None:
        original(batch, logs)
        self._after_batch(batch, logs)

    def _around_epoch_end(self, original: Any, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._preempted_mid_epoch:  # the partial epoch's end: no callback (History, loggers) records it
            internals.skip_validation(self.model, False)
            return
        original(epoch, logs)
        self._after_epoch(epoch, logs)

    def _around_train_end(self, original: Any, logs: dict[str, Any] | None = None) -> None:
        self._ending = True
        try:
            self._restore_callbacks()  # nothing trained (finished, or a signal at the start): History etc.
            original(logs=logs)
        finally:
            self._after_train(logs)
        if self.preempted and self.exit_on_preemption:
            raise SystemExit(self.exit_code)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._undo_hooks is None:
            self._before_epoch(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # Also keeps Keras from dispatching batch ends to a thread pool: saves happen in order, in this thread.
        if self._undo_hooks is None:
            self._after_batch(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._undo_hooks is None:
            self._after_epoch(epoch, logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self._ending:  # no hooks; or called by hand after fit raised: then only clean up
            self._after_train(logs, finishing=self._undo_hooks is None)
            if self.preempted and self.exit_on_preemption:
                raise SystemExit(self.exit_code)

    # ---------------------------------------------------------------- what happens at each moment
    def _before_epoch(self, epoch: int) -> None:
        resume = self._resume
        if resume is not None and epoch == self._epoch:
            assert self._state is not None
            self._restore_callbacks()
            prog, rng_state = resume["progress"], self._state["rng"]
            if self._batch > 0:
                self._state["metrics"].apply()  # after Keras reset them for this epoch
                self._epoch_rng = prog["epoch_rng"]
                self._epoch_iterators = prog.get("iterators")
                KerasRNGState().load_state_dict(prog["epoch_rng"])  # replays the epoch's shuffle
                assert self._fit is not None
                internals.skip_steps_next_epoch(
                    self._fit["epoch_iterator"], self._batch, lambda: rng_state.load_state_dict(rng_state.loaded)
                )
                return
            rng_state.load_state_dict(prog["epoch_rng"] if self._restart_epoch else rng_state.loaded)
        self._epoch, self._batch = epoch, 0
        self._epoch_rng = KerasRNGState().state_dict()
        self._epoch_iterators = None if self._count_iterators is None else self._count_iterators()

    def _after_batch(self, batch: int, logs: dict[str, Any] | None) -> None:
        self._global += batch + 1 - self._batch
        self._batch = batch + 1
        steps = self.params.get("steps") if self.params else None
        last = steps is not None and self._batch >= steps
        due = (self.save_freq != "epoch" and self._global % int(self.save_freq) == 0) or (
            self.save_every_seconds is not None and self.manager.should_save(-1)
        )
        if self.watcher.triggered and not last:  # the last batch is saved at the epoch end, after validation
            self._stopped_mid_epoch = self._preempted_mid_epoch = True
            internals.skip_validation(self.model, True)
            self._stop_for_signal(logs)
        elif due and not last:
            self._save(logs)
        elif due:
            self._due_at_epoch_end = True

    def _after_epoch(self, epoch: int, logs: dict[str, Any] | None) -> None:
        steps = self.params.get("steps") if self.params else None
        if not self._stopped_mid_epoch and steps is not None and self._batch < steps:
            # Another callback set stop_training mid-epoch: the epoch is not done, so do not record it as
            # done; the last batch checkpoint stands and a new fit resumes from it.
            log.info("autockpt: training stopped at batch %d of epoch %d; not saving the partial epoch as done",
                     self._batch, epoch)
            self._stopped_mid_epoch = True
        if self._stopped_mid_epoch:
            return
        epochs = self.params.get("epochs") if self.params else None
        self._finished = bool(self.model.stop_training)  # a callback (EarlyStopping) ended the run here
        self._epoch, self._batch = epoch + 1, 0
        if self._count_iterators is not None:  # those made so far come before the next epoch's
            self._epoch_iterators = self._count_iterators()
        due = (self.save_freq == "epoch" or self._due_at_epoch_end or self._finished
               or (epochs is not None and self._epoch >= epochs))
        self._due_at_epoch_end = False
        if due and not self.watcher.triggered:
            self._save(logs)
        if self.watcher.triggered:  # before this epoch end, in a callback's on_epoch_end, or during that save
            self._stop_for_signal(logs)

    def _after_train(self, logs: dict[str, Any] | None, finishing: bool = True) -> None:
        try:
            if not finishing or self._state is None:
                pass
            elif self.watcher.triggered:  # e.g. in another callback's on_train_end
                self._stop_for_signal(logs)
            elif not self._stopped_mid_epoch and self._progress() != self._saved:
                self._save(logs)  # the finished state, so running the same fit again trains no more
            self.manager.wait_until_finished()
        finally:
            self.watcher.uninstall()
            internals.set_initial_epoch(self.model, None)
            internals.skip_validation(self.model, False)
            if self._undo_hooks is not None:
                self._undo_hooks()
            self._undo_hooks, self._fit, self._ending = None, None, True

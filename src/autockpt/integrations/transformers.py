"""Hugging Face ``Trainer``: ``AutoCheckpoint``, a callback that saves the training state and resumes on its own.

```python
from transformers import Trainer, TrainingArguments
from autockpt.integrations.transformers import AutoCheckpoint

args = TrainingArguments("out", save_strategy="no", max_steps=10_000)
trainer = Trainer(model, args, train_dataset=ds, callbacks=[AutoCheckpoint("s3://bucket/run", save_steps=500)])
trainer.train()          # the same call after a crash or preemption continues where it stopped
```

How it hooks into Trainer (transformers 5.x; see ``SUPPORTED_TRANSFORMERS``):

- Trainer computes the resume position (epochs done, batches to skip in the current epoch) from
  ``train(resume_from_checkpoint=...)`` before any callback runs, and its callbacks are never handed the
  ``Trainer``. So, once, in ``on_init_end`` (called by ``Trainer.__init__``), the callback takes the ``Trainer``
  from the caller's frame and puts wrappers on *that instance* (never on the class) around ``train`` and the
  methods where Trainer writes and reads its checkpoint files. ``train()`` without ``resume_from_checkpoint``
  then reads the newest autockpt checkpoint that verifies and runs Trainer's own resume path with it: Trainer
  skips the finished epochs and, inside the epoch, the trained batches without loading them (accelerate's
  ``skip_first_batches``), and puts the RNGs back after the first batch is drawn, as for its own checkpoints;
  the state comes from autockpt instead of Trainer's pickles. The only file Trainer reads is a
  ``trainer_state.json`` (JSON) in a temporary directory. An explicit ``resume_from_checkpoint`` still wins.
- Saving: wherever Trainer would write ``checkpoint-N`` (after the step's logging and evaluation, so the
  log history and best metric are in), autockpt saves instead: the trainable weights (for a PEFT model the
  adapter), buffers, optimizer, LR scheduler, GradScaler, ``TrainerState`` and every rank's Python/NumPy/torch RNGs
  (``PerRank``: under DDP each rank restores its own),
  tensors in safetensors and the rest as JSON, never pickle. The frozen parameters (a PEFT base model) are
  not written: their content hash is, and a resume onto a different base raises ``StateMismatchError``.
- Preemption: SIGTERM/SIGUSR1 set a flag; at the end of the current step the callback saves and stops
  ``train()``, which returns normally; then the process exits with ``128 + signal`` (143 for SIGTERM) unless
  ``exit_on_preemption=False``.

Everything private this module touches is in ``_TRAINER_METHODS`` and ``_trainer_from_stack``;
``tests/test_transformers.py`` pins them.

One job: the Hugging Face Trainer callback. Imports transformers (and peft when present) and
``autockpt.errors``, ``manager``, ``options``, ``per_rank``, ``preemption``, ``retention`` and ``rng``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import xxhash

from autockpt.errors import InvalidArgumentError, StateMismatchError
from autockpt.manager import CheckpointManager
from autockpt.options import ManagerOptions, check_bool, check_directory, check_positive
from autockpt.per_rank import PerRank
from autockpt.preemption import PreemptionWatcher
from autockpt.retention import KeepBest
from autockpt.rng import RNGState

try:
    import torch
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(
        "autockpt.integrations.transformers needs transformers and torch: pip install 'autockpt[transformers]'"
    ) from e

log = logging.getLogger("autockpt")

SUPPORTED_TRANSFORMERS = ">=5.0,<6 (tested with transformers 5.24.0, peft 0.21.2, accelerate 1.15.0 and 1.16.0)"
DEFAULT_EVERY_N_SECONDS = 600.0
_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "trainer_state", "rng", "frozen")

# --------------------------------------------------------------------------------- Trainer internals
# Everything private this integration touches (transformers 5.x). tests/test_transformers.py pins it.
# Each is replaced on the Trainer *instance* by AutoCheckpoint._bind; the originals stay in use for a
# ``resume_from_checkpoint`` path the user passes.
_TRAINER_METHODS = (
    "_save_checkpoint",              # (model, trial): where Trainer writes checkpoint-N
    "_load_from_checkpoint",         # (checkpoint, model=None): model weights, before accelerate.prepare
    "_load_optimizer_and_scheduler",  # (checkpoint): after the optimizer and scheduler exist
    "_load_scaler",                  # (checkpoint): after _load_optimizer_and_scheduler
    "_load_rng_state",               # (checkpoint): when the first resumed batch has been drawn
    "_load_best_model",              # (): load_best_model_at_end
)


def _trainer_from_stack() -> Any:
    """The ``Trainer`` whose ``__init__`` is calling ``on_init_end`` right now (None if there is none)."""
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


# --------------------------------------------------------------------------------- helpers


def _any_rank(*flags: bool) -> list[bool]:
    """Each flag, True on every rank if it is True on any rank of an initialised torch.distributed group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # one collective for all flags
    return [bool(v) for v in t.tolist()]


def _split_model_state(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what is saved, what is only hashed): trainable parameters and buffers vs frozen parameters."""
    saved, frozen = {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.nn.Parameter) and not value.requires_grad:
            frozen[key] = value.detach()
        else:
            saved[key] = value.detach()
    return saved, frozen


def _content_hash(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """xxh3-64 over every frozen tensor's name, dtype, shape and bytes, in key order."""
    h = xxhash.xxh3_64()
    nbytes = 0
    for key in sorted(tensors):
        t = tensors[key].detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(memoryview(data))
        nbytes += data.nbytes
    return {"xxh3_64": h.hexdigest(), "tensors": len(tensors), "bytes": nbytes}


class _HeldRNG(RNGState):
    """A restore target for the RNGs that holds them until Trainer's moment to load them (after the first resumed
    batch is drawn). On a rank beyond those that saved, the manager asks it to derive the rank's own stream."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self.derive_rank: int | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state

    def derive_for_rank(self, rank: int) -> None:
        self.derive_rank = rank

    def apply(self) -> None:
        """Put the held state into the process's generators (then derive this rank's stream if it has none)."""
        if self.state is not None:
            RNGState().load_state_dict(self.state)
            if self.derive_rank is not None:
                RNGState().derive_for_rank(self.derive_rank)


# --------------------------------------------------------------------------------- the callback


class AutoCheckpoint(TrainerCallback):
    """Saves the Trainer's training state with autockpt and resumes from it, with the same ``train()`` call.

    Args:
        directory: a local path or fsspec URL (``s3://bucket/run``); one directory per run.
        save_steps: save when the global step is a multiple of this.
        save_every_seconds: save when this many seconds passed since the last save. With neither, every 600 s.
            The last step, and the step at which a preemption signal arrived, are always saved. Saves that
            Trainer's own ``save_strategy`` asks for are written by autockpt too (set ``save_strategy="no"``
            to leave the decision to this callback).
        max_to_keep: how many of the newest checkpoints to keep (``None``: all).
        keep_every_n_hours: also keep one checkpoint per N hours of the run, forever.
        metric_for_best: also keep the ``keep_best`` best checkpoints by this evaluation metric (``"loss"`` or
            ``"eval_loss"``); defaults to ``TrainingArguments.metric_for_best_model``.
        greater_is_better: for ``metric_for_best``; defaults to ``TrainingArguments.greater_is_better``, or to
            False for a metric named ``*loss`` and True otherwise.
        keep_best: how many best checkpoints to keep.
        async_save: write checkpoints in a background thread (training continues once tensors are copied).
        storage_options: passed to fsspec (credentials, endpoint URL, ...).
        exit_on_preemption: after a SIGTERM/SIGUSR1 stopped ``train()``, exit the process with ``128 + signal``
            once ``train()`` has finished its teardown (so a scheduler restarts it). With False, ``train()``
            returns and ``preempted``/``exit_code`` tell what happened.
        cloud_notices: on AWS, GCP or Azure, also watch the instance metadata for a spot/preemption notice
            and treat it as SIGTERM (see ``autockpt.cloud_notice``); ``False`` turns that off.

    Pass it in ``Trainer(callbacks=[...])`` (not ``add_callback`` later): it needs to see the Trainer being
    built. After ``train()``: ``restored_step`` (None for a fresh start), ``preempted``, ``exit_code``.

    ```python
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from autockpt.integrations.transformers import AutoCheckpoint

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (32, 8))]
    args = TrainingArguments("/tmp/hf_out", max_steps=8, per_device_train_batch_size=4, save_strategy="no",
                             report_to=[], use_cpu=True)
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[AutoCheckpoint("/tmp/autockpt_hf_demo", save_steps=4)])
    trainer.train()   # run it again: it resumes, here finding the run complete
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        save_steps: int | None = None,
        save_every_seconds: float | None = None,
        max_to_keep: int | None = 5,
        keep_every_n_hours: float | None = None,
        metric_for_best: str | None = None,
        greater_is_better: bool | None = None,
        keep_best: int = 1,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        exit_on_preemption: bool = True,
        cloud_notices: bool = True,
    ) -> None:
        check_directory(directory)
        check_positive("save_steps", save_steps, int)
        check_positive("save_every_seconds", save_every_seconds, float)
        # the options shared with the manager, checked by the manager's own checkers (the same error texts)
        ManagerOptions(max_to_keep, keep_every_n_hours, async_save=async_save, storage_options=storage_options)
        if metric_for_best is not None and (not isinstance(metric_for_best, str) or not metric_for_best):
            raise InvalidArgumentError(
                f"metric_for_best must be an evaluation metric name such as 'loss' or 'eval_accuracy', "
                f"or None, got {metric_for_best!r}")
        if greater_is_better is not None:
            check_bool("greater_is_better", greater_is_better)
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 1:
            raise InvalidArgumentError(f"keep_best must be a positive int (how many best checkpoints), got "
                                       f"{keep_best!r}")
        check_bool("exit_on_preemption", exit_on_preemption)
        if save_steps is None and save_every_seconds is None:
            save_every_seconds = DEFAULT_EVERY_N_SECONDS
        self.directory = os.fspath(directory)
        self.save_steps = save_steps
        self.save_every_seconds = save_every_seconds
        self.metric_for_best = metric_for_best
        self.greater_is_better = greater_is_better
        self.keep_best = keep_best
        self.exit_on_preemption = exit_on_preemption
        # Passed to CheckpointManager as they are: a new manager option is one more entry here.
        self._manager_options: dict[str, Any] = {
            "max_to_keep": max_to_keep,
            "keep_every_n_hours": keep_every_n_hours,
            "async_save": async_save,
            "storage_options": dict(storage_options or {}),
        }
        self.restored_step: int | None = None
        self.preempted = False
        self.signal: int | None = None
        self._trainer: Any = None
        self._manager: CheckpointManager | None = None
        self._watcher = PreemptionWatcher(cloud_notices=cloud_notices)
        self._marker: str | None = None  # the resume_from_checkpoint we hand Trainer; a temporary directory
        self._pending: dict[str, Any] = {}  # restored state waiting for the moment Trainer loads it
        self._frozen_hash: dict[str, Any] | None = None
        self._last_saved: int | None = None
        self._last_save_time = time.monotonic()
        self._eval: tuple[int, dict[str, float]] | None = None
        self._metric: str | None = None

    @property
    def exit_code(self) -> int:
        """0 unless preempted; then ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1)."""
        if not self.preempted:
            return 0
        return 128 + int(self.signal if self.signal is not None else signal.SIGTERM)

    # ------------------------------------------------------------------ binding to the Trainer
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _trainer_from_stack()
        if trainer is None:  # pragma: no cover - Trainer always calls on_init_end from __init__
            return
        if self._trainer is not None and self._trainer is not trainer:
            raise InvalidArgumentError("this AutoCheckpoint is already used by another Trainer; create one per "
                                       "Trainer")
        self._bind(trainer)

    def _bind(self, trainer: Any) -> None:
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
            raise InvalidArgumentError(
                "AutoCheckpoint does not support DeepSpeed or FSDP in the Trainer yet (their states are sharded "
                "and saved by their own engines); use Trainer's own checkpointing there, or DDP / one process")
        self._trainer = trainer
        originals = {name: getattr(trainer, name) for name in ("train", *_TRAINER_METHODS)}
        mine: dict[str, Callable[..., Any]] = {
            "_save_checkpoint": lambda model, trial=None, *a, **k: self._save(trainer),
            "_load_from_checkpoint": lambda checkpoint, model=None: None,  # ours come with the optimizer
            "_load_optimizer_and_scheduler": lambda checkpoint: self._load_optimizer_and_scheduler(trainer),
            "_load_scaler": lambda checkpoint: self._load_scaler(trainer),
            "_load_rng_state": lambda checkpoint: self._load_rng(),
            "_load_best_model": lambda: self._load_best_model(trainer),
        }

        def route(name: str) -> Callable[..., Any]:
            original = originals[name]

            def method(*a: Any, **k: Any) -> Any:
                checkpoint = a[0] if a else k.get("checkpoint", k.get("resume_from_checkpoint"))
                ours = name in ("_save_checkpoint", "_load_best_model") or (
                    self._marker is not None and checkpoint == self._marker)
                return mine[name](*a, **k) if ours else original(*a, **k)

            return method

        for name in _TRAINER_METHODS:
            setattr(trainer, name, route(name))

        def train(resume_from_checkpoint: Any = None, *a: Any, **k: Any) -> Any:
            return self._train(trainer, originals["train"], resume_from_checkpoint, *a, **k)

        trainer.train = train
        args = trainer.args
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy == "best":
            warnings.warn(
                "autockpt: with save_strategy='best', Trainer cancels every save at a step with an evaluation that "
                "is not a new best, including the ones AutoCheckpoint asks for (its interval, the last step, a "
                "preemption). Use save_strategy='no' (or 'steps' for load_best_model_at_end): AutoCheckpoint keeps "
                "the best checkpoints by metric_for_best anyway.", UserWarning, stacklevel=3)
        elif strategy != "no" and not args.load_best_model_at_end:
            warnings.warn(
                f"autockpt: Trainer's own checkpointing is on (save_strategy={args.save_strategy!r}, "
                f"save_steps={args.save_steps}); those saves are now written by autockpt to {self.directory} "
                "(no checkpoint-N folders, no pickles). Pass save_strategy='no' to TrainingArguments to save only "
                "when AutoCheckpoint(save_steps=..., save_every_seconds=...) says so.",
                UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ resume
    def _train(self, trainer: Any, original: Callable[..., Any], resume_from_checkpoint: Any, *a: Any,
               **k: Any) -> Any:
        self.preempted, self.signal, self.restored_step = False, None, None
        self._manager = CheckpointManager(self.directory, keep_best=self._keep_best(trainer.args),
                                                   **self._manager_options)
        self._frozen_hash = None
        self._eval = None
        self._last_saved = None
        self._watcher.received = None
        try:
            self._manager.acquire()  # a second writer fails here, before restoring and training
            if resume_from_checkpoint is None or isinstance(resume_from_checkpoint, bool):
                resume_from_checkpoint = self._restore(trainer)  # True too: never "no checkpoint found"
            self._watcher.install()
            result = original(resume_from_checkpoint, *a, **k)
            self._manager.wait_until_finished()
        finally:
            self._watcher.uninstall()
            if self._marker is not None:
                shutil.rmtree(self._marker, ignore_errors=True)
                self._marker = None
            self._pending = {}
            self._manager.close()
        if self.preempted:
            name = signal.Signals(self.signal).name if self.signal is not None else "SIGTERM"
            step = int(trainer.state.global_step)
            if step == self._last_saved:
                log.warning("autockpt: %s: saved step %d to %s; stopping (exit code %d)", name, step,
                            self.directory, self.exit_code)
            else:  # the save failed (see the warning before) or save_strategy="best" cancelled it
                log.warning("autockpt: %s: step %d was not saved; the newest checkpoint of this run in %s is step "
                            "%s; stopping (exit code %d)", name, step, self.directory, self._last_saved,
                            self.exit_code)
            if self.exit_on_preemption:
                sys.exit(self.exit_code)
        return result

    def _keep_best(self, args: Any) -> KeepBest | None:
        metric = self.metric_for_best or args.metric_for_best_model
        if metric is None:
            self._metric = None
            return None
        self._metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        greater = self.greater_is_better
        if greater is None:
            greater = args.greater_is_better if self.metric_for_best is None and args.greater_is_better is not None \
                else not self._metric.endswith("loss")
        return KeepBest(self._metric, mode="max" if greater else "min", k=self.keep_best)

    def _read(self, step: int | None) -> tuple[int | None, dict[str, Any]]:
        """The checkpoint of ``step`` (newest that verifies if None), checksums verified, as plain values."""
        assert self._manager is not None
        target: dict[str, Any] = {k: {} for k in _STATE_KEYS}
        target["rng"] = PerRank(_HeldRNG())  # this rank's own RNGs (every rank's were saved)
        got = self._manager.restore(target, step)
        target["rng"] = target["rng"].value
        return got, target

    def _restore(self, trainer: Any) -> str | None:
        step, saved = self._read(None)
        if step is None:
            log.info("autockpt: no checkpoint in %s; starting fresh", self.directory)
            return None
        if not isinstance(saved.get("trainer_state"), dict) or "global_step" not in saved["trainer_state"]:
            raise StateMismatchError(
                f"the checkpoint of step {step} in {self.directory} was not written by "
                "autockpt.integrations.transformers.AutoCheckpoint (no Trainer state in it); use an empty "
                "directory for this run")
        self._check_model(trainer.model, saved, step)  # the weights are copied once the optimizer fits too
        self._marker = tempfile.mkdtemp(prefix="autockpt-hf-resume-")
        with open(os.path.join(self._marker, "trainer_state.json"), "w") as f:
            json.dump(saved["trainer_state"], f)
        self._pending = saved
        self.restored_step = self._last_saved = step
        log.info("autockpt: resuming Trainer from step %d in %s", step, self.directory)
        return self._marker

    def _load_model(self, model: Any, saved: dict[str, Any], step: int) -> None:
        """Check the frozen base and every saved key, shape and dtype, then copy the weights in place."""
        self._check_model(model, saved, step)
        self._copy_model(model, saved["model"])

    @staticmethod
    def _copy_model(model: Any, weights: Mapping[str, Any]) -> None:
        live, _ = _split_model_state(model)  # the model's tensors now (Trainer may have moved it to a device)
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(weights[key])

    def _check_model(self, model: Any, saved: dict[str, Any], step: int) -> None:
        """Raise StateMismatchError unless the frozen base and every saved key, shape and dtype fit ``model``."""
        live, frozen = _split_model_state(model)
        have = _content_hash(frozen)
        want = saved["frozen"]
        if have != want:
            raise StateMismatchError(
                f"the frozen parameters of the model differ from those the checkpoint of step {step} in "
                f"{self.directory} was trained with (checkpoint: {want}, this model: {have}); load the same base "
                "model (and the same adapter configuration) as the run that wrote it, or use a new directory")
        self._frozen_hash = have  # frozen parameters do not change: the saves of this train() reuse it
        weights = saved["model"]
        missing = sorted(set(live) - set(weights))
        unexpected = sorted(set(weights) - set(live))
        mismatched = [f"{k} (model {live[k].dtype}{list(live[k].shape)}, checkpoint "
                      f"{weights[k].dtype}{list(weights[k].shape)})"
                      for k in sorted(set(live) & set(weights))
                      if live[k].shape != weights[k].shape or live[k].dtype != weights[k].dtype]
        if missing or unexpected or mismatched:
            raise StateMismatchError(
                f"the checkpoint of step {step} does not fit the model; nothing was restored. missing: "
                f"{missing[:10]}, unexpected: {unexpected[:10]}, mismatched: {mismatched[:10]}",
                missing=missing, unexpected=unexpected, mismatched=mismatched)

    def _load_optimizer_and_scheduler(self, trainer: Any) -> None:
        """Trainer built the optimizer: load it, then (only if it fit) the model weights held since ``_restore``,
        so that a checkpoint that does not fit the optimizer never leaves the model half-restored."""
        saved = self._pending
        try:
            trainer.optimizer.load_state_dict(saved.pop("optimizer"))
        except (ValueError, KeyError, RuntimeError) as e:
            raise StateMismatchError(f"the optimizer state in {self.directory} does not fit this optimizer: {e}; "
                                     "nothing was restored into the model; use the same optimizer and parameters "
                                     "as the run that wrote it") from e
        sched = saved.pop("scheduler")
        if trainer.lr_scheduler is not None and sched is not None:
            trainer.lr_scheduler.load_state_dict(sched)
        self._apply_pending_model(trainer)

    def _apply_pending_model(self, trainer: Any) -> None:
        weights = self._pending.pop("model", None)
        if weights is not None:
            self._copy_model(trainer.model, weights)

    def _load_scaler(self, trainer: Any) -> None:
        saved = self._pending.pop("scaler", None)
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and saved:
            scaler.load_state_dict(saved)

    def _load_rng(self) -> None:
        rng = self._pending.pop("rng", None)
        if rng is not None:
            rng.apply()

    def _load_best_model(self, trainer: Any) -> None:
        best = trainer.state.best_global_step
        if self.preempted or not best:
            return
        assert self._manager is not None
        self._manager.wait_until_finished()
        step, saved = self._read(int(best))
        self._load_model(trainer.model, saved, int(best))
        log.info("autockpt: loaded the best model (step %d, %s=%s) from %s", best, self._metric,
                 trainer.state.best_metric, self.directory)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer is None:
            raise InvalidArgumentError(
                "AutoCheckpoint must be passed to the Trainer when it is built: Trainer(..., callbacks="
                "[AutoCheckpoint(...)]); trainer.add_callback() comes too late to resume")
        if self.restored_step is not None:  # Trainer drops a best checkpoint that is not a local directory
            state.best_model_checkpoint = self._best_path(state)
            self._apply_pending_model(self._trainer)  # if Trainer did not load an optimizer (none to load)
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------ saving
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if metrics:
            self._eval = (int(state.global_step), dict(metrics))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        due = step != self._last_saved and (
            (self.save_steps is not None and step % self.save_steps == 0)
            or 0 < state.max_steps <= step or control.should_training_stop)
        timed = self.save_every_seconds is not None and \
            time.monotonic() - self._last_save_time >= self.save_every_seconds
        timed, stop = _any_rank(timed, self._watcher.triggered)  # every rank decides alike
        if stop:
            self.preempted = True
            self.signal = self._watcher.received
            control.should_training_stop = True
        if due or timed or stop:
            control.should_save = True  # Trainer logs and evaluates this step, then calls _save_checkpoint

    def _best_path(self, state: Any) -> str | None:
        best = state.best_global_step
        if not best or self._manager is None or best not in self._manager.all_steps():
            return None
        return f"{self._manager.directory.rstrip('/')}/step_{int(best):010d}"

    def _save(self, trainer: Any) -> None:
        """Replaces Trainer._save_checkpoint: one autockpt checkpoint of the step Trainer just finished."""
        assert self._manager is not None
        state = trainer.state
        step = int(state.global_step)
        if step == self._last_saved:
            return
        # Like Trainer: stateful callbacks (e.g. EarlyStoppingCallback) and TrainerControl go into the state.
        from transformers.trainer_callback import ExportableState

        for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control]
                   if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(state.stateful_callbacks.get(name), list):
                state.stateful_callbacks[name].append(cb.state())
            else:
                state.stateful_callbacks[name] = cb.state()
        weights, frozen = _split_model_state(trainer.model)
        if self._frozen_hash is None:  # frozen parameters do not change: hashed once per train()
            self._frozen_hash = _content_hash(frozen)
        scaler = getattr(trainer.accelerator, "scaler", None)
        metrics = {}
        if self._metric is not None and self._eval is not None and self._eval[0] == step \
                and self._metric in self._eval[1]:
            metrics[self._metric] = self._eval[1][self._metric]
        trainer_state = dataclasses.asdict(state)
        trainer_state["best_model_checkpoint"] = None  # set below once the checkpoint exists
        written = self._manager.save(
            step,
            {"model": weights, "optimizer": trainer.optimizer, "scheduler": trainer.lr_scheduler,
             "scaler": scaler.state_dict() if scaler is not None else None, "trainer_state": trainer_state,
             "rng": PerRank(RNGState()), "frozen": self._frozen_hash},
            metrics=metrics, force=True,
            metadata={"integration": "transformers", "epoch": state.epoch,
                      "training_args": json.loads(trainer.args.to_json_string())},
        )
        if not written:  # the manager warned (disk full, storage unreachable); training goes on
            return
        self._last_saved = step
        self._last_save_time = time.monotonic()
        if state.best_global_step:
            self._manager.wait_until_finished()
            state.best_model_checkpoint = self._best_path(state)


__all__ = ["AutoCheckpoint", "SUPPORTED_TRANSFORMERS"]

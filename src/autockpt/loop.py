"""``autockpt.resume``: crash and preemption recovery for a plain training loop in a few changed lines.

An epoch loop keeps its shape (``run.epochs``; each batch of ``data=`` is one step):

```python
loader = autockpt.ResumableLoader(dataset, batch_size=64, shuffle=True)      # was torch's DataLoader
run = autockpt.resume("checkpoints", model=model, optimizer=opt, scheduler=sched, data=loader)
for epoch in run.epochs(1, epochs + 1):                                       # was range(1, epochs + 1)
    train(model, loader, opt)                                                 # `for x, y in loader:` inside
    test(model, test_loader)
    sched.step()
```

A loop counted in steps:

```python
with autockpt.resume("s3://bucket/run7", model=model, optimizer=opt, scheduler=sched, data=loader,
                     every_n_steps=500, max_to_keep=3) as run:
    batches = run.batches(loader)          # endless: epoch after epoch, from the restored position
    for step in run.steps(100_000):        # like range(run.step, 100_000)
        x, y = next(batches)
        ...                                # one optimizer update
        run.log(loss=loss.item())
sys.exit(run.exit_code)                    # 0 when finished; 128 + signal number when preempted
```

Steps: a step is the number of completed optimizer updates; the checkpoint of step N holds the state after
N updates. ``run.steps(total)`` yields ``run.step, ..., total - 1``; when the body for value ``s`` has
finished, ``s + 1`` steps are complete, and that is when saving happens (when the loop asks for the next
value). So a checkpoint never holds a half-done update: if the body raises, nothing is saved, and the
previous checkpoint stays the newest.

Preemption: SIGTERM and SIGUSR1 (configurable; Ctrl-C too) only set a flag (``PreemptionWatcher``). The step
in progress finishes, a checkpoint of it is saved, the loop stops, ``run.preempted`` is True and ``run.exit_code``
is ``128 + signal`` (143 for SIGTERM), the code a shell reports for a process that signal ended, so that a
supervisor restarts it; ``run.epochs`` ends the process with that code itself (``Preempted``, a ``SystemExit``).
A signal that arrives while restoring, during evaluation, or during the final save ends the same way: the
newest completed step is committed (or the checkpoint stays as it was if no step completed), and one log line
says which. Handlers installed before keep running; signals that arrive during the final save
are recorded and ignored, so they cannot interrupt or corrupt it.

Requeueing: end the script with ``sys.exit(run.exit_code)``. Kubernetes (a Job or a Pod with
``restartPolicy: OnFailure``) restarts a container that exits non-zero, and the restart resumes. On SLURM, submit
with ``--requeue`` (and ``--signal=B:TERM@120`` for an early warning), or requeue yourself when
``run.preempted``: ``subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]])``. A process that
is killed without warning (SIGKILL, OOM, a lost node) resumes from the newest checkpoint the interval saved.

One job: the plain training loop's ``resume``/``Run``. Imports ``autockpt.data``, ``errors``, ``format``,
``manager``, ``options``, ``per_rank``, ``preemption`` and ``rng``.
"""

from __future__ import annotations

import logging
import signal
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from autockpt.data import ResumableLoader, is_plain_dataloader
from autockpt.errors import InvalidArgumentError, StateMismatchError
from autockpt.format import is_stateful
from autockpt.manager import CheckpointManager
from autockpt.options import ManagerOptions, check_directory, check_positive
from autockpt.per_rank import PerRank
from autockpt.preemption import DEFAULT_SIGNALS, Preempted, PreemptionWatcher
from autockpt.rng import RNGState

log = logging.getLogger("autockpt")

DEFAULT_EVERY_N_SECONDS = 600.0
_RESERVED = ("model", "optimizer", "scheduler", "data", "rng", "loop")
_MANAGER_OPTIONS = tuple(p for p in ManagerOptions.names() if p not in ("save_interval_steps", "save_interval_seconds"))


class _Progress:
    """The loop's own state, saved as ``loop``: epochs completed under ``run.epochs()``, and whether
    ``run.stop()`` ended training early (then a re-run trains nothing)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.run._epochs_done, "stopped": self.run.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epochs, stopped = state.get("epochs"), state.get("stopped")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0 or not isinstance(stopped, bool):
            raise StateMismatchError(f"loop state must be {{'epochs': int >= 0, 'stopped': bool}}, got {state!r}")
        self.run._epochs_done, self.run.stopped = epochs, stopped


class Run:
    """The handle ``autockpt.resume(...)`` returns; use it as a context manager (``run.epochs()`` also
    enters and leaves it by itself).

    Attributes:
        step: completed optimizer updates so far (on entry: the restored step, 0 when starting fresh).
        restored: whether entering restored a checkpoint.
        preempted: whether a signal stopped the loop (after saving the step in progress).
        finished: whether training reached its end (or ``run.stop()`` ended it) and that was saved.
        stopped: whether ``run.stop()`` ended training early (saved: a re-run trains nothing).
        signal: the number of the signal that stopped it, or None.
        manager: the underlying :class:`~autockpt.CheckpointManager`.
        state: the mapping of names to objects that is saved and restored.
    """

    def __init__(
        self,
        directory: Any,
        state: dict[str, Any],
        every_n_steps: int | None,
        every_n_seconds: float | None,
        signals: Iterable[int | str],
        catch_sigint: bool,
        manager_options: dict[str, Any],
        cloud_notices: bool = True,
    ) -> None:
        self.state = state
        self.state["loop"] = _Progress(self)
        self.manager = CheckpointManager(
            directory, save_interval_steps=every_n_steps, save_interval_seconds=every_n_seconds, **manager_options
        )
        self._watcher = PreemptionWatcher(signals, catch_sigint=catch_sigint, cloud_notices=cloud_notices)
        self.step = 0
        self.restored = False
        self.preempted = False
        self.finished = False
        self.stopped = False
        self._metrics: dict[str, Any] = {}
        self._entered = False
        self._stepping = False
        self._in_step = False  # run.steps(): a value was yielded and its body has not finished
        self._epochs_done = 0
        self._saved_step: int | None = None  # the newest step known to have a checkpoint
        self._exit_on_stop = False  # run.epochs(): a preemption ends the process (raises Preempted)

    @property
    def signal(self) -> int | None:
        return self._watcher.received if self.preempted else None

    @property
    def exit_code(self) -> int:
        """0 unless preempted; then ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C)."""
        sig = self.signal
        if sig is None and self.preempted:  # stopped because another rank was signalled
            sig = signal.SIGTERM
        return 0 if sig is None else 128 + int(sig)

    # ------------------------------------------------------------------------------------------ context
    def __enter__(self) -> Run:
        if self._entered:
            raise InvalidArgumentError("this run was already entered; call autockpt.resume(...) again")
        self._entered = True
        self._watcher.install()
        originals = dict(self.state)
        try:
            self.manager.acquire()  # a second writer fails here, before restoring and training
            try:
                restored = self.manager.restore(self.state)
            except StateMismatchError as e:  # written before the loop's own entry existed: restore the rest
                if e.missing != ["loop"] or e.unexpected or e.mismatched:
                    raise
                progress = self.state.pop("loop")
                try:
                    restored = self.manager.restore(self.state)
                finally:
                    self.state["loop"] = progress
            for key, orig in originals.items():  # plain containers were replaced in self.state: update them
                new = self.state[key]
                if new is not orig and isinstance(orig, MutableMapping) and isinstance(new, Mapping):
                    orig.clear()
                    orig.update(new)
                    self.state[key] = orig
                elif new is not orig and isinstance(orig, list) and isinstance(new, (list, tuple)):
                    orig[:] = new
                    self.state[key] = orig
        except BaseException:
            self._watcher.uninstall()
            self.manager.close()
            raise
        self.restored = restored is not None
        self.step = restored or 0
        self._saved_step = restored
        if self.restored:
            log.info("autockpt: resuming at step %d from %s%s", self.step, self.manager.directory,
                     " (training was stopped early: nothing to train)" if self.stopped else "")
        else:
            log.info("autockpt: no checkpoint in %s; starting fresh", self.manager.directory)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.manager.__exit__(exc_type, exc, tb)  # waits for an in-flight save
        finally:
            self._watcher.uninstall()

    # ------------------------------------------------------------------------------------------ the loop
    def steps(self, total: int) -> Iterator[int]:
        """Yield ``run.step, ..., total - 1``; save after each completed step that is due, on preemption and at
        the end. Stops early (after saving) when a watched signal arrived, or after ``run.stop()``.

        ```python
        for step in run.steps(1000):
            ...  # one optimizer update
        ```
        """
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise InvalidArgumentError(f"total must be an int >= 0 (the number of steps to reach), got {total!r}")
        if not self._entered:
            raise InvalidArgumentError("use the run as a context manager: `with autockpt.resume(...) as run:`")
        if self._stepping:
            raise InvalidArgumentError("run.steps() is already being iterated; one loop per run")
        return self._steps(total)

    def _steps(self, total: int) -> Iterator[int]:
        self._stepping = True
        try:
            if self.stopped:
                return
            if self._signalled():  # a signal came before the first step
                self._stop()
                return
            while self.step < total:
                self._in_step = True
                yield self.step
                if self.stopped:  # run.stop() in the body counted and saved the step
                    return
                self._in_step = False
                # the body for that value returned: one more update is complete
                self.step += 1
                if self.step >= total:
                    break
                if self._signalled():
                    self._stop()
                    return
                self._save()
            self._finish()
        finally:
            self._stepping = self._in_step = False

    def epochs(self, start: int, stop: int | None = None) -> Iterator[int]:
        """Yield epoch numbers like ``range(start, stop)`` (or ``range(start)``), from the restored epoch on.

        Wrap the epoch loop of an ordinary script; its body iterates the loader passed as ``data=`` (an
        :class:`autockpt.ResumableLoader`) as usual. Each batch the loop takes is one step: when it asks
        for the next batch (or the epoch ends) the previous step is complete, counted, and saved when due
        (``every_n_steps``); the save of an epoch's last step waits until the per-epoch code after the batch
        loop (evaluation, ``scheduler.step()``) has run. A resumed epoch starts at the first batch not yet
        trained (the earlier ones are not loaded); per-epoch code stays where it is.

        Preemption (SIGTERM/SIGUSR1): the step in progress finishes (or, in per-epoch code, the epoch's code
        finishes), its checkpoint is committed, a log line says which step, and the process ends with
        ``128 + signal`` (``autockpt.preemption.Preempted``, a ``SystemExit``): code after the loop does not
        run on a half-trained model. Without a ``with`` block the run is entered here and closed at the end.

        ```python
        import torch, autockpt
        model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = autockpt.ResumableLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4,
                                          shuffle=True)
        run = autockpt.resume("/tmp/epochs_demo", model=model, optimizer=opt, data=loader, every_n_steps=2)
        for epoch in run.epochs(1, 4):            # like range(1, 4)
            for (x,) in loader:                   # one step per batch
                opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
            print(epoch, run.step)                # per-epoch code stays where it is
        ```
        """
        first, end = (0, start) if stop is None else (start, stop)
        for name, value in (("start", first), ("stop", end)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"epochs({name}=...) must be an int, got {value!r}")
        loader = self.state.get("data")
        if not isinstance(loader, ResumableLoader):
            raise InvalidArgumentError(
                "run.epochs() counts a step per batch of the loader passed as data=; pass "
                "data=autockpt.ResumableLoader(dataset, batch_size=..., shuffle=True) to autockpt.resume"
            )
        if self._stepping:
            raise InvalidArgumentError("this run is already being iterated; one loop per run")
        return self._epochs(first, end, loader)

    def _epochs(self, first: int, end: int, loader: ResumableLoader) -> Iterator[int]:
        own = not self._entered
        if own:
            self.__enter__()
        self._stepping = self._exit_on_stop = True
        loader._run = self
        try:
            if self.stopped:
                return
            if self._signalled():  # came before the first step (e.g. while restoring)
                self._stop()
            while first + self._epochs_done < end:
                loader._next_epoch(self._epochs_done)
                yield first + self._epochs_done
                if self.stopped:
                    return
                if loader._pending:  # the loop left the batch loop early: its last batch's step is complete
                    loader._pending = False
                    self._complete_step(deferred=True)
                self._epochs_done += 1  # the epoch's code ran: the checkpoint of this step holds the next epoch
                loader._next_epoch(self._epochs_done)
                if first + self._epochs_done >= end:
                    break
                if self._signalled():
                    self._stop()
                self._save()
            self._finish()
        finally:
            loader._run = None
            self._stepping = self._exit_on_stop = False
            if own:
                self.__exit__(None, None, None)

    def _complete_step(self, deferred: bool = False) -> None:
        """A step finished (under ``run.epochs()``, when the loop asks for the next batch): count it, stop if
        signalled, else save when due (``deferred``: at the epoch's end, after its per-epoch code)."""
        self.step += 1
        if self._signalled():
            self._stop()
        elif not deferred:
            self._save()

    def _signalled(self) -> bool:
        """Whether to stop: this process got a signal or, under torch.distributed, any rank did."""
        # every rank checks in (at most rank_timeout s; a missing rank raises SaveError naming it)
        return self.manager._coord.any_rank(self._watcher.triggered, self.step)

    def _save(self, force: bool = False) -> bool:
        written = self.manager.save(self.step, self.state, metrics=self._metrics, force=force)
        if written:
            self._saved_step = self.step
        return written

    def _say_stopping(self, written: bool, where: str | None = None) -> None:
        name = signal.Signals(self._watcher.received).name if self._watcher.received else "SIGTERM"
        directory, code = self.manager.directory, self.exit_code
        if written:
            log.warning("autockpt: %s: saved step %d to %s; stopping (exit code %d)", name, self.step,
                        where or directory, code)
        elif self._saved_step == self.step:
            log.warning("autockpt: %s: no step completed since step %d (the newest checkpoint in %s); stopping "
                        "(exit code %d)", name, self.step, directory, code)
        else:
            log.error("autockpt: %s: could not save step %d to %s (the newest checkpoint is step %s); stopping "
                      "(exit code %d)", name, self.step, directory, self._saved_step, code)

    def _stop(self) -> None:
        """Preempted: save the step (unless it has a checkpoint), say so, and stop."""
        written = self._save(force=True)
        where = self.manager.durability(self.step)  # with local_dir: its upload, up to upload_deadline_s
        self.preempted = True
        self._say_stopping(written, where)
        self._leave()

    def _finish(self) -> None:
        """The end: save the last step; a signal that came meanwhile still ends the process with its code."""
        written = self._save(force=True)
        self.manager.wait_until_finished()
        self.finished = True
        if self._signalled():
            self.preempted = True
            self._say_stopping(written)
            self._leave()

    def _leave(self) -> None:
        if self._exit_on_stop:  # run.epochs(): end the process with 128 + signal, the checkpoint committed
            self.manager.close()
            self._watcher.uninstall()
            raise Preempted(self.exit_code)

    def stop(self) -> None:
        """End training on purpose (early stopping): the step in progress counts as complete, it is saved as
        finished, and the loop ends (at its next iteration, or ``break`` at once). A re-run of the script
        restores it and trains nothing, whatever the number of steps or epochs it asks for.

        ```python
        import torch, autockpt
        model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = autockpt.ResumableLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
        run = autockpt.resume("/tmp/stop_demo", model=model, optimizer=opt, data=loader)
        for epoch in run.epochs(100):
            for (x,) in loader:
                opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
            if epoch == 2:                        # e.g. no improvement for a while
                run.stop()
                break
        assert run.stopped and run.step == 6      # and a re-run trains nothing
        ```
        """
        if not self._entered:
            raise InvalidArgumentError("run.stop() is for inside the training loop of an entered run")
        loader = self.state.get("data")
        if self._in_step or (isinstance(loader, ResumableLoader) and loader._pending):
            self.step += 1
            self._in_step = False
            if isinstance(loader, ResumableLoader):
                loader._pending = False
        self.stopped = True
        self._save(force=True)
        self.manager.wait_until_finished()
        self.finished = True
        log.info("autockpt: training stopped early at step %d; saved to %s", self.step, self.manager.directory)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Endless batches: iterate ``loader`` epoch after epoch (from its restored position).

        Stops only if ``loader`` yields nothing twice in a row (an empty loader).
        """
        empty = 0
        while empty < 2:
            empty += 1
            for batch in loader:
                empty = 0
                yield batch

    def log(self, **metrics: Any) -> None:
        """Record metrics for the checkpoints saved from now on (``keep_best`` ranks checkpoints by them)."""
        self._metrics.update(self.manager._clean_metrics(metrics))

    def save(self) -> bool:
        """Save the current step now (between steps), whether due or not; False if it already has a checkpoint."""
        return self._save(force=True)


def resume(
    directory: Any,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    data: Any = None,
    state: Mapping[str, Any] | None = None,
    every_n_steps: int | None = None,
    every_n_seconds: float | None = None,
    rng: bool = True,
    signals: Iterable[int | str] = DEFAULT_SIGNALS,
    catch_sigint: bool = True,
    cloud_notices: bool = True,
    **manager_options: Any,
) -> Run:
    """Restore the newest valid checkpoint of ``directory`` on entry (or start fresh), save as the loop goes.

    Args:
        directory: a local path or fsspec URL (``s3://bucket/run7``).
        model, optimizer, scheduler: objects with ``state_dict()``/``load_state_dict()``, restored in place.
        data: the data position: an :class:`autockpt.ResumableLoader`, a :class:`autockpt.ResumableSampler`
            (exact only with ``num_workers=0``), or any loader with ``state_dict()``/``load_state_dict()``
            such as torchdata's ``StatefulDataLoader``. A plain ``DataLoader`` cannot be positioned: it is
            refused with a warning (a resumed run would repeat or skip samples).
        state: more things to save and restore, by name: ``{"ema": ema, "scaler": scaler, "extra": {...}}``.
            Stateful objects and tensors are restored in place, dicts and lists are updated in place; other
            plain values (an int) are replaced in ``run.state``: read them back from there.
        every_n_steps, every_n_seconds: when to save, besides at the end and on preemption. If neither is
            given, every 600 seconds.
        rng: also save and restore Python's, NumPy's and torch's (CPU and CUDA) random generators; under
            ``torch.distributed`` every rank's own (``autockpt.PerRank``), restored into the same rank.
        signals: the signals that mean "preempted: save and stop" (default SIGTERM and SIGUSR1).
        catch_sigint: treat the first Ctrl-C the same way (a second one interrupts at once).
        cloud_notices: on AWS, GCP or Azure, also watch the instance metadata for a spot/preemption notice
            and treat it as the first of ``signals`` (see ``autockpt.cloud_notice``); ``False`` turns it off.
        **manager_options: passed to :class:`~autockpt.CheckpointManager`: ``max_to_keep``, ``keep_best``,
            ``keep_every_n_hours``, ``async_save``, ``storage_options``, ``local_dir``, ``local_max_to_keep``,
            ``upload_deadline_s`` (a fast local tier in front of ``directory``: README "Preemptible machines").

    ```python
    import torch, autockpt
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with autockpt.resume("/tmp/resume_demo", model=model, optimizer=opt, every_n_steps=10) as run:
        for step in run.steps(50):
            opt.zero_grad(); loss = model(torch.randn(8, 4)).pow(2).mean(); loss.backward(); opt.step()
            run.log(loss=loss.item())
    assert run.step == 50 and run.manager.latest_step == 50
    ```
    """
    check_directory(directory)
    check_positive("every_n_steps", every_n_steps, int)
    check_positive("every_n_seconds", every_n_seconds, float)
    if every_n_steps is None and every_n_seconds is None:
        every_n_seconds = DEFAULT_EVERY_N_SECONDS
    unknown = sorted(set(manager_options) - set(_MANAGER_OPTIONS))
    if unknown:
        raise InvalidArgumentError(
            f"autockpt.resume got unknown options {unknown}; it takes every_n_steps/every_n_seconds and the "
            f"CheckpointManager options {list(_MANAGER_OPTIONS)}"
        )
    if not isinstance(rng, bool):
        raise InvalidArgumentError(f"rng must be True or False, got {rng!r}")
    if state is not None and not isinstance(state, Mapping):
        raise InvalidArgumentError(f"state must be a dict of names to objects, got {type(state).__name__}")
    full: dict[str, Any] = {}
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if not is_stateful(obj):
            raise InvalidArgumentError(
                f"{name} must have state_dict() and load_state_dict() (a torch module, optimizer or scheduler), "
                f"got {type(obj).__name__}"
            )
        full[name] = obj
    if data is not None:
        if isinstance(data, ResumableLoader):
            full["data"] = data  # the same on every rank: its global count of consumed samples fits any world size
        elif is_stateful(data):
            full["data"] = PerRank(data)  # a loader's position of its own on each rank
        elif is_plain_dataloader(data):
            warnings.warn(
                "autockpt.resume: a plain torch DataLoader cannot save its position, so a resumed run would "
                "repeat or skip samples; the data position is NOT saved. Use autockpt.ResumableLoader(dataset, "
                "batch_size=..., shuffle=True, seed=...) instead (or a loader with state_dict()/load_state_dict()).",
                UserWarning, stacklevel=2,
            )
        else:
            raise InvalidArgumentError(
                f"data must have state_dict() and load_state_dict() (autockpt.ResumableLoader, a stateful "
                f"loader), got {type(data).__name__}"
            )
    if rng:
        full["rng"] = PerRank(RNGState())  # every rank's own generators
    for key, obj in (state or {}).items():
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"state keys must be non-empty str, got {key!r}")
        if key in _RESERVED:
            raise InvalidArgumentError(
                f"state key {key!r} is taken by resume's own argument; pass it as {key}=... or rename it"
            )
        full[key] = obj
    if not full:
        raise InvalidArgumentError("nothing to checkpoint: pass model=, optimizer=, state= or rng=True")
    return Run(directory, full, every_n_steps, every_n_seconds, signals, catch_sigint, dict(manager_options),
               cloud_notices)

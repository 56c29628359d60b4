"""Asynchronous saves: a snapshot of the tensors in reused host buffers, written by one background thread.

One job: ``async_save=True``'s mechanics, apart from the manager's decisions. ``snapshot`` copies each tensor
into its host staging buffer (reused from the previous save while it still fits; pinned for CUDA sources;
``prepare`` allocates them ahead of the first save, in the background) and waits for the device copies to
land; ``start`` runs the write in a background thread at the lowest CPU priority (Linux); ``join`` waits for
it and raises its error. Imports ``autockpt.errors`` and ``autockpt.format``; torch only through ``sys.modules``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import numpy as np

from autockpt.errors import SaveError
from autockpt.format import TensorEntry, is_torch_tensor

log = logging.getLogger("autockpt")
_NICE = 19  # the background writer's nice value (Linux, per thread)


class BackgroundSaver:
    """At most one save in flight; its host buffers are kept for the next snapshot.

    ```python
    import numpy as np
    from autockpt.format import TensorEntry
    from autockpt.staging import BackgroundSaver
    saver = BackgroundSaver()
    entry = TensorEntry("w", np.ones(3), "numpy", "F64", [3])
    staged = saver.snapshot([entry])
    saver.start(1, lambda: None, on_failure=lambda e: None)
    saver.join()
    assert staged[0].value.tolist() == [1.0, 1.0, 1.0]
    ```
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}  # tensor name -> host buffer, reused between saves
        self._thread: threading.Thread | None = None
        self._preparing: threading.Thread | None = None  # allocating staging buffers ahead of the first save
        self._error: BaseException | None = None
        self._step, self._finished = -1, True  # the in-flight save's step; whether its write() returned (or none ran)
        self._on_failure: Callable[[BaseException], None] = lambda e: None

    @property
    def staged(self) -> bool:
        """Whether staging buffers exist or are being prepared."""
        return bool(self._buffers) or self._preparing is not None

    def prepare(self, entries: list[TensorEntry]) -> None:
        """Allocate and touch the staging buffers for ``entries`` in a low-priority background thread, so that
        the first ``snapshot`` copies into ready memory (no page faults, no pinning while training waits).

        Does nothing once buffers exist or are being prepared; ``snapshot`` waits for it to finish."""
        if self._buffers or self._preparing is not None:
            return
        specs = [(e.name, e.value) for e in entries]

        def run() -> None:
            _lower_priority()
            made = {}
            try:
                for name, value in specs:
                    buf = _new_buffer(value)
                    if is_torch_tensor(buf):
                        buf.zero_()  # touch every page now
                    else:
                        buf.fill(0)
                    made[name] = buf
            except Exception as e:  # e.g. out of memory: the first snapshot allocates what is missing
                log.debug("autockpt: staging buffers ahead of the first save: %r", e)
            self._buffers.update(made)

        self._preparing = threading.Thread(target=run, name="autockpt-stage-ahead", daemon=True)
        self._preparing.start()

    def snapshot(self, entries: list[TensorEntry], skip: Collection[str] = ()) -> list[TensorEntry]:
        """The entries with their values copied to host staging buffers (the training may change them now).

        Entries named in ``skip`` (their bytes are already stored: a deduplicated save hashed them) are not
        copied: their value becomes None, and their staging buffer is freed.
        """
        if self._preparing is not None:
            self._preparing.join()
        staged = []
        for e in entries:
            if e.name in skip:
                self._buffers.pop(e.name, None)
                staged.append(replace(e, value=None))
            else:
                staged.append(replace(e, value=self._stage(e)))
        _sync_devices()
        return staged

    def _stage(self, entry: TensorEntry) -> Any:
        """Copy a tensor into its host staging buffer, reused from the previous save when it still fits."""
        value = entry.value
        buf: Any = self._buffers.get(entry.name)
        if is_torch_tensor(value):
            value = value.detach()
            if not (is_torch_tensor(buf) and buf.shape == value.shape and buf.dtype == value.dtype):
                buf = _new_buffer(value)
            buf.copy_(value, non_blocking=value.device.type == "cuda")
        else:
            value = np.asarray(value)
            if not (isinstance(buf, np.ndarray) and buf.shape == value.shape and buf.dtype == value.dtype):
                buf = _new_buffer(value)
            np.copyto(buf, value)
        self._buffers[entry.name] = buf
        return buf

    def start(self, step: int, write: Callable[[], None], on_failure: Callable[[BaseException], None]) -> None:
        """Run ``write()`` in the background; a failure is logged, told to ``on_failure`` and kept for ``join``."""
        def run() -> None:
            try:
                _lower_priority()
                write()
                self._finished = True
            except BaseException as e:  # surfaced by the next save()/wait_until_finished()/close()
                if not isinstance(e, Exception):  # the thread was made to die (SystemExit, KeyboardInterrupt, ...)
                    e = self._died(repr(e))
                log.error("autockpt: background save of step %d failed: %r", step, e)
                on_failure(e)
                self._error = e

        self._step, self._finished, self._on_failure = step, False, on_failure
        self._thread = threading.Thread(target=run, name=f"autockpt-save-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the in-flight write finished (its error, if any, stays for ``join``)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if not self._finished and self._error is None:  # it died where not even its handler ran
                self._error = self._died("the thread ended without finishing")
                self._on_failure(self._error)

    def _died(self, how: str) -> SaveError:
        return SaveError(
            f"the background save of step {self._step} died before it committed ({how}): step {self._step} was "
            "not saved; earlier checkpoints are intact and the partial files are removed at the next start. "
            "Save again (the next save() writes a whole checkpoint)."
        )

    def join(self) -> None:
        """Block until the in-flight write finished; raise its error if it failed."""
        self.wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def _new_buffer(value: Any) -> Any:
    """An empty host buffer shaped like ``value`` (a torch tensor: pinned for a CUDA source; else numpy)."""
    if is_torch_tensor(value):
        torch = sys.modules["torch"]
        return torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=value.device.type == "cuda")
    return np.empty_like(np.asarray(value), order="C")


def _lower_priority() -> None:
    """Give the calling thread (and the threads it starts) the lowest CPU priority, so that the training threads
    run first and the write takes the CPU they leave (Linux: a thread id is a process id to setpriority)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        except OSError:  # not permitted here: the write runs at the training's priority
            pass


def _sync_devices() -> None:
    """Wait for the non-blocking device-to-host copies of a snapshot to land."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()

"""Turning preemption signals into a flag that a training loop checks at step boundaries.

A signal handler must not save: it runs between two bytecodes of whatever the program was doing, perhaps
half-way through an optimizer update. ``PreemptionWatcher`` only records the signal; the loop (or callback)
finishes the current step, saves, and stops.

One job: turning a preemption signal into a flag. Imports ``autockpt.errors`` and ``autockpt.cloud_notice``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

from autockpt.cloud_notice import CloudNotice, CloudNoticeWatcher
from autockpt.errors import InvalidArgumentError

log = logging.getLogger("autockpt")

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by ``run.epochs()`` once the preemption checkpoint is committed: it ends the process with
    ``128 + signal`` (143 for SIGTERM) so that a scheduler restarts it, and skips the code after the loop.
    In a notebook, catch it: ``except autockpt.preemption.Preempted as e: e.code``."""


def _signal_numbers(signals: Iterable[int | str]) -> tuple[int, ...]:
    out = []
    for s in signals:
        if isinstance(s, str):
            name = s.upper() if s.upper().startswith("SIG") else "SIG" + s.upper()
            if not hasattr(signal, name):
                raise InvalidArgumentError(f"unknown signal name {s!r}; use e.g. 'SIGTERM' or signal.SIGUSR1")
            out.append(int(getattr(signal, name)))
        elif isinstance(s, int) and not isinstance(s, bool):
            out.append(int(s))
        else:
            raise InvalidArgumentError(f"signals must be signal numbers or names, got {s!r}")
    return tuple(out)


class PreemptionWatcher:
    """Records SIGTERM/SIGUSR1 (configurable), and optionally Ctrl-C, as a flag instead of dying.

    Handlers installed before are still called (a SLURM requeue handler keeps working), except the default
    actions that would end the process at once. With ``catch_sigint=True`` the first Ctrl-C sets the flag
    and a second one raises ``KeyboardInterrupt`` as usual. Repeated signals while the final save runs are
    recorded and otherwise ignored, so they cannot interrupt it.

    With ``cloud_notices=True`` (the default), ``install()`` also starts a
    :class:`~autockpt.cloud_notice.CloudNoticeWatcher`: on AWS, GCP or Azure (recognised from DMI files or
    ``AUTOCKPT_CLOUD``; off-cloud it sends nothing) a preemption notice raises the first watched signal
    (SIGTERM by default) in this process, so it takes exactly the path a SIGTERM takes. ``cloud_notices=False``
    or ``AUTOCKPT_CLOUD=none`` turns it off.

    ```python
    from autockpt.preemption import PreemptionWatcher
    with PreemptionWatcher() as watcher:
        for step in range(1000):
            ...  # one optimizer update
            if watcher.triggered:
                ...  # save, then stop
                break
    ```
    """

    def __init__(
        self, signals: Iterable[int | str] = DEFAULT_SIGNALS, catch_sigint: bool = False, cloud_notices: bool = True
    ) -> None:
        self.signals = _signal_numbers(signals)
        if not isinstance(catch_sigint, bool):
            raise InvalidArgumentError(f"catch_sigint must be True or False, got {catch_sigint!r}")
        if not isinstance(cloud_notices, bool):
            raise InvalidArgumentError(f"cloud_notices must be True or False, got {cloud_notices!r}")
        self._notices = CloudNoticeWatcher(self._on_cloud_notice) if cloud_notices and self.signals else None
        self.catch_sigint = catch_sigint
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._installed = False

    @property
    def triggered(self) -> bool:
        """True once a watched signal arrived."""
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            log.warning("autockpt: received %s; will save at the end of the current step and stop",
                        signal.Signals(signum).name)
        prev = self._previous.get(signum)
        if callable(prev) and signum != signal.SIGINT:
            prev(signum, frame)

    def install(self) -> PreemptionWatcher:
        """Install the handlers (main thread only; elsewhere it warns and watches nothing)."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("autockpt: not in the main thread; preemption signals will not be caught")
            return self
        sigs = self.signals + ((signal.SIGINT,) if self.catch_sigint else ())
        for s in sigs:
            self._previous[s] = signal.signal(s, self._handle)
        self._installed = True
        if self._notices is not None:
            self._notices.start()
        return self

    def _on_cloud_notice(self, notice: CloudNotice) -> None:
        """From the notice thread: raise our signal, so the notice takes the path a real one takes.

        Only while our handlers are installed (``uninstall`` stops the notice thread first and waits for this),
        so a process without a handler is never killed by it.
        """
        if not self._installed or self.received is not None:
            return
        log.warning("autockpt: %s: saving at the end of the current step and stopping", notice.description)
        signal.raise_signal(signal.SIGTERM if signal.SIGTERM in self.signals else self.signals[0])

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        if not self._installed:
            return
        if self._notices is not None:
            self._notices.stop()
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self._installed = False

    def __enter__(self) -> PreemptionWatcher:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

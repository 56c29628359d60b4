"""``HoldWrites``: keeps a background save in flight for as long as a test needs (used by keras_windows.py and
train_epochs.py, which signal themselves while a save is still being written)."""

from __future__ import annotations

import os
import threading
from typing import Any


class HoldWrites:
    """Holds every thread but the main one at its next ``os.fsync`` while ``holding`` (a profile hook for the
    threads started after ``install``): a background save is then certainly still in flight."""

    def __init__(self) -> None:
        self.holding = False
        self.released = threading.Event()

    def install(self) -> None:
        threading.setprofile(self._hook)

    def _hook(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and arg is os.fsync and self.holding:
            self.released.wait(60)

    def release(self) -> None:
        self.holding = False
        self.released.set()

"""SIGKILL a writer at many points of save(): the newest checkpoint always verifies and nothing committed is lost."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import autockpt
from autockpt.reader import open_checkpoint
from autockpt.storage import open_storage as Storage

SCRIPT = Path(__file__).parent / "scripts" / "kill_writer.py"


def _run(url: str, n_saves: int, kill_at: int, floats: int = 20_000, kill_after: float | None = None
         ) -> tuple[int, list[int]]:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), url, str(n_saves), str(kill_at), str(floats)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        time.sleep(kill_after)
        proc.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -9), err
    return proc.returncode, [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]


def _check(url: str, history: list[int]) -> None:
    """Everything the policy keeps of the committed history is there, verifies and restores."""
    storage = Storage(url)
    on_disk = sorted(storage.scan().committed)
    assert set(on_disk) <= set(history), f"uncommitted step on storage: {on_disk} vs {history}"
    expected = sorted(history)[-2:]
    assert set(expected) <= set(on_disk), f"lost a committed checkpoint: kept {on_disk}, expected {expected}"
    for step in on_disk:
        with open_checkpoint(storage, step) as ckpt:  # raises if it does not verify
            assert ckpt.state()["meta"]["step"] == step
    mgr = autockpt.CheckpointManager(url)  # a new process would do exactly this
    if history:
        assert mgr.latest_step == max(history)
        target = {"w": np.zeros(20_000, np.float32), "idx": np.zeros(10, np.int64), "meta": None}
        assert mgr.restore(target) == max(history)
        assert (target["w"] == max(history)).all() and target["meta"] == {"step": max(history)}
    tmp = [n for n in os.listdir(url) if n.startswith(".tmp-")] if os.path.isdir(url) else []  # killed early
    assert tmp == [], f"leftovers not cleaned: {tmp}"


def test_sigkill_at_every_filesystem_operation_of_save(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    rc, committed = _run(url, 3, 0)  # a clean run: how many operations do three saves take?
    history = list(committed)
    _check(url, history)
    trials = 0
    kill_at = 1
    while trials < 60:
        rc, committed = _run(url, 3, kill_at)
        history += committed
        # the step in flight when killed counts as committed once its directory was renamed into place
        in_flight = max(history) + 1
        if in_flight in Storage(url).scan().committed:
            history.append(in_flight)
        _check(url, history)
        if rc == -9:
            trials += 1
            kill_at += 1
        else:
            kill_at = 1  # past the last operation of the three saves: start over from the first one
    assert trials >= 50


def test_sigkill_at_random_moments_during_large_saves(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    rng = random.Random(1234)
    history: list[int] = []
    for _ in range(12):
        _, committed = _run(url, 4, 0, floats=20_000, kill_after=rng.uniform(0.3, 1.5))
        history += committed
        in_flight = (max(history) if history else 0) + 1
        if in_flight in Storage(url).scan().committed:
            history.append(in_flight)
        _check(url, history)

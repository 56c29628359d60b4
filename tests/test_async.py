"""Asynchronous saves: the background writer dying mid-save is reported and commits nothing; staging ahead."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import pytest
import torch

import autockpt
from autockpt.errors import SaveError
from autockpt.storage import step_dirname


def _kill_thread(name: str) -> None:
    """Make the running thread ``name`` die at its next Python instruction (a real asynchronous SystemExit)."""
    thread = next(t for t in threading.enumerate() if t.name == name)
    assert thread.ident is not None
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
    assert hit == 1, f"thread {name} was not running"


@pytest.mark.parametrize("dedup", [True, False])
def test_writer_dying_mid_save_is_reported_and_commits_nothing(tmp_path: Path, dedup: bool) -> None:
    state = {f"w{i}": torch.full((4 * 2**20,), float(i)) for i in range(4)}  # 64 MiB: the write takes a while
    mgr = autockpt.CheckpointManager(tmp_path, async_save=True, max_to_keep=None, dedup=dedup)
    assert mgr.save(1, state)
    mgr.wait_until_finished()
    assert mgr.save(2, {k: v + 1 for k, v in state.items()})
    _kill_thread("autockpt-save-2")  # dies before it could have written 64 MiB and committed
    with pytest.raises(SaveError, match=r"step 2.*(interrupted|died).*intact") as info:
        mgr.wait_until_finished()
    assert "SystemExit" in str(info.value)
    assert not (tmp_path / step_dirname(2)).exists()
    assert autockpt.CheckpointManager(tmp_path).all_steps() == [1]
    assert mgr.save(3, state)  # the manager goes on: the next save writes a whole checkpoint
    mgr.close()
    assert autockpt.CheckpointManager(tmp_path).all_steps() == [1, 3]
    loaded = autockpt.load(tmp_path, step=3)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert leftovers == [], leftovers


def test_writer_dying_is_reported_by_the_next_save(tmp_path: Path) -> None:
    state = {f"w{i}": torch.full((4 * 2**20,), float(i)) for i in range(4)}
    mgr = autockpt.CheckpointManager(tmp_path, async_save=True, max_to_keep=None, max_consecutive_failures=1)
    assert mgr.save(1, state)
    _kill_thread("autockpt-save-1")
    with pytest.raises(SaveError, match=r"step 1.*SystemExit"):
        mgr.save(2, state)
    assert autockpt.CheckpointManager(tmp_path).all_steps() == []


def test_staging_buffers_are_prepared_ahead_of_the_first_save(tmp_path: Path) -> None:
    state = {"w": torch.arange(1000.0), "b": torch.ones(3, dtype=torch.bfloat16), "n": 5}
    with autockpt.CheckpointManager(tmp_path, async_save=True, save_interval_steps=10) as mgr:
        assert not mgr._background.staged
        assert not mgr.save(1, state)  # not due: the staging buffers are allocated in the background
        assert mgr._background.staged and mgr._background._preparing is not None
        mgr._background._preparing.join()
        prepared = {id(b) for b in mgr._background._buffers.values()}
        assert len(prepared) == 2
        state["w"] += 1
        assert mgr.save(10, state)  # the first save copies into the prepared buffers, not new ones
        assert {id(b) for b in mgr._background._buffers.values()} == prepared
    loaded = autockpt.load(tmp_path)
    assert torch.equal(loaded["w"], torch.arange(1000.0) + 1) and torch.equal(loaded["b"], state["b"])
    target = {"w": torch.zeros(1000), "b": torch.zeros(3, dtype=torch.bfloat16), "n": 0}
    with autockpt.CheckpointManager(tmp_path, async_save=True) as mgr:
        assert mgr.restore(target) == 10  # a restore stages ahead too
        assert mgr._background.staged
        target["w"] += 1
        assert mgr.save(11, target)
    assert torch.equal(autockpt.load(tmp_path, step=11)["w"], torch.arange(1000.0) + 2)


def test_a_restore_that_finds_nothing_stages_ahead_too(tmp_path: Path) -> None:
    """A fresh run (the plain loop's resume, the callbacks' start) restores nothing; its first save, even one
    due at once, copies into buffers allocated meanwhile, not new ones."""
    state = {"w": torch.arange(1000.0), "n": 5}
    with autockpt.CheckpointManager(tmp_path, async_save=True) as mgr:
        assert mgr.restore(state) is None
        assert mgr._background.staged
        mgr._background._preparing.join()
        prepared = {id(b) for b in mgr._background._buffers.values()}
        assert len(prepared) == 1
        assert mgr.save(1, state)
        assert {id(b) for b in mgr._background._buffers.values()} == prepared
    assert torch.equal(autockpt.load(tmp_path)["w"], state["w"])

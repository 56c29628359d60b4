"""CheckpointManager on local disk, memory:// and a real S3-compatible server."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import autockpt
from autockpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StateMismatchError,
)
from autockpt.storage import open_storage as Storage
from autockpt.storage import step_dirname


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()


def _objects(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return model, opt, sched


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_restore_is_exact_and_in_place(storage: tuple[str, dict[str, Any]]) -> None:
    url, opts = storage
    model, opt, sched = _objects(0)
    _train(model, opt, sched, 3)
    with autockpt.CheckpointManager(url, storage_options=opts) as mgr:
        assert mgr.save(3, {"model": model, "opt": opt, "sched": sched, "rng": autockpt.RNGState(), "epoch": 1})
        assert mgr.all_steps() == [3] and mgr.latest_step == 3
    expected_next = torch.rand(2)
    saved = _snapshot(model)
    _train(model, opt, sched, 2)  # the uninterrupted continuation
    continued = _snapshot(model)

    model2, opt2, sched2 = _objects(1)
    ids = [id(p) for p in model2.parameters()]
    state = {"model": model2, "opt": opt2, "sched": sched2, "rng": autockpt.RNGState(), "epoch": 0}
    with autockpt.CheckpointManager(url, storage_options=opts) as mgr:
        assert mgr.restore(state) == 3
    assert [id(p) for p in model2.parameters()] == ids  # parameters keep their identity
    assert all(torch.equal(saved[k], v) for k, v in model2.state_dict().items())
    assert state["epoch"] == 1 and sched2.last_epoch == 3
    assert torch.equal(torch.rand(2), expected_next)  # the RNG continues where it was saved
    # the optimizer built on the same parameters keeps working, and continues exactly as the original did
    _train(model2, opt2, sched2, 2)
    assert all(torch.equal(continued[k], v) for k, v in model2.state_dict().items())


def test_empty_directory_restores_nothing(storage: tuple[str, dict[str, Any]]) -> None:
    url, opts = storage
    model, _, _ = _objects()
    before = _snapshot(model)
    mgr = autockpt.CheckpointManager(url, storage_options=opts)
    assert mgr.restore({"model": model}) is None
    assert mgr.latest_step is None and mgr.all_steps() == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointNotFoundError):
        mgr.restore({"model": model}, step=5)
    with pytest.raises(CheckpointNotFoundError):
        autockpt.load(url, storage_options=opts)


def test_retention_max_to_keep_and_keep_best(storage: tuple[str, dict[str, Any]]) -> None:
    url, opts = storage
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.7, 6: 0.8, 7: 0.6}
    kb = autockpt.KeepBest("val_loss", mode="min", k=2)
    with autockpt.CheckpointManager(url, max_to_keep=2, keep_best=kb, storage_options=opts) as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"w": np.full(3, step, np.float32)}, metrics={"val_loss": loss})
        assert mgr.all_steps() == [2, 4, 6, 7]
    # a restarted manager keeps applying the same policy to what is on storage
    with autockpt.CheckpointManager(url, max_to_keep=2, keep_best=kb, storage_options=opts) as mgr:
        assert mgr.all_steps() == [2, 4, 6, 7]
        mgr.save(8, {"w": np.full(3, 8, np.float32)}, metrics={"val_loss": 0.15})
        assert mgr.all_steps() == [4, 7, 8]
    assert autockpt.load(url, step=4, storage_options=opts)["w"].tolist() == [4, 4, 4]


def _damage_payload(url: str, opts: dict[str, Any], step: int) -> None:
    st = Storage(url, opts)
    path = st.path(step_dirname(step), "tensors.safetensors")
    data = bytearray(st.fs.cat_file(path))
    data[-1] ^= 0xFF
    st.fs.pipe_file(path, bytes(data))


def test_falls_back_past_a_damaged_newest_checkpoint(storage: tuple[str, dict[str, Any]],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    url, opts = storage
    with autockpt.CheckpointManager(url, storage_options=opts, dedup=False) as mgr:
        mgr.save(1, {"w": torch.full((4,), 1.0)})
        mgr.save(2, {"w": torch.full((4,), 2.0)})
    _damage_payload(url, opts, 2)
    target = {"w": torch.zeros(4)}
    with caplog.at_level(logging.WARNING, logger="autockpt"):
        assert autockpt.CheckpointManager(url, storage_options=opts).restore(target) == 1
    assert any("step_0000000002" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    assert torch.equal(target["w"], torch.full((4,), 1.0))
    with pytest.raises(CorruptCheckpointError):
        autockpt.CheckpointManager(url, storage_options=opts).restore(target, step=2)
    assert torch.equal(target["w"], torch.full((4,), 1.0))
    assert autockpt.load(url, storage_options=opts)["w"][0] == 1.0


def test_latest_step_skips_a_checkpoint_that_fails_its_checksum(storage: tuple[str, dict[str, Any]],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    url, opts = storage
    with autockpt.CheckpointManager(url, storage_options=opts, dedup=False) as mgr:  # damages tensors.safetensors
        mgr.save(1, {"w": torch.full((4,), 1.0)})
        mgr.save(2, {"w": torch.full((4,), 2.0)})
        _damage_payload(url, opts, 2)  # same size, one byte flipped: only the checksum can tell
        with caplog.at_level(logging.WARNING, logger="autockpt"):
            assert mgr.latest_step == 1  # the manager that wrote it verifies too
    assert any("step_0000000002" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    fresh = autockpt.CheckpointManager(url, storage_options=opts)
    assert fresh.latest_step == 1 and fresh.latest_step == 1
    with autockpt.CheckpointManager(url, storage_options=opts, dedup=False) as mgr:  # damages tensors.safetensors
        mgr.save(3, {"w": torch.full((4,), 3.0)})
    # checksums are read once per manager: damage after that is what restore's own full check catches
    reader = autockpt.CheckpointManager(url, storage_options=opts)
    assert reader.latest_step == 3
    _damage_payload(url, opts, 3)
    assert reader.latest_step == 3  # the documented, cheaper guarantee: sizes only after the first check
    target = {"w": torch.zeros(4)}
    assert reader.restore(target) == 1 and torch.equal(target["w"], torch.full((4,), 1.0))


def test_mismatch_raises_before_anything_is_copied(tmp_path: Path) -> None:
    model, opt, _ = _objects()
    with autockpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model, "opt": opt, "w": torch.ones(3)})
    torch.manual_seed(5)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    before = _snapshot(wider)
    w = torch.zeros(3)
    with pytest.raises(StateMismatchError) as ei:
        autockpt.CheckpointManager(tmp_path).restore({"model": wider, "opt": opt, "w": w})
    assert any("model/2.weight" in m for m in ei.value.mismatched)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items()) and w.sum() == 0
    # missing / unexpected keys, named
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with pytest.raises(StateMismatchError) as ei:
        autockpt.CheckpointManager(tmp_path).restore({"model": other, "opt": opt, "w": w})
    assert "model/1.running_mean" in ei.value.unexpected and "model/1.weight" in " ".join(ei.value.mismatched)
    with pytest.raises(StateMismatchError) as ei:
        autockpt.CheckpointManager(tmp_path).restore({"model": model, "opt": opt, "w": w, "ema": torch.zeros(1)})
    assert ei.value.missing == ["ema"]
    with pytest.raises(StateMismatchError, match="float64|F64"):
        w64 = torch.zeros(3, dtype=torch.float64)
        autockpt.CheckpointManager(tmp_path).restore({"model": model, "opt": opt, "w": w64})
    # an optimizer over a different set of parameters
    opt_small = torch.optim.AdamW(list(model.parameters())[:2])
    with pytest.raises(StateMismatchError, match="param_groups"):
        autockpt.CheckpointManager(tmp_path).restore({"model": model, "opt": opt_small, "w": w})


def test_intervals_and_force(tmp_path: Path) -> None:
    mgr = autockpt.CheckpointManager(tmp_path, save_interval_steps=5, max_to_keep=None)
    saved = [s for s in range(1, 13) if mgr.save(s, {"s": s})]
    assert saved == [5, 10] and mgr.should_save(15) and not mgr.should_save(16)
    assert mgr.save(11, {"s": 11}, force=True)
    assert not mgr.save(11, {"s": 11}, force=True)  # already committed
    timed = autockpt.CheckpointManager(tmp_path / "t", save_interval_seconds=0.2)
    assert not timed.should_save(1)
    time.sleep(0.25)
    assert timed.save(1, {"s": 1}) and not timed.should_save(2)


def test_async_save_snapshot_and_errors(tmp_path: Path) -> None:
    w = torch.zeros(1000)
    with autockpt.CheckpointManager(tmp_path, async_save=True) as mgr:
        assert mgr.save(1, {"w": w})
        w.fill_(7.0)  # changing the weights after save() returns never changes what is saved
        mgr.wait_until_finished()
        assert mgr.latest_step == 1
    assert torch.equal(autockpt.load(tmp_path)["w"], torch.zeros(1000))
    # a background failure surfaces on the next call instead of vanishing
    run = tmp_path / "run2"
    mgr = autockpt.CheckpointManager(run, async_save=True, max_consecutive_failures=2)
    assert mgr.save(1, {"w": w})
    mgr.wait_until_finished()
    shutil.rmtree(run)
    run.write_text("a file where the directory should be")  # the next background write cannot succeed
    assert mgr.save(2, {"w": w})  # queued: the failure happens in the background thread
    with pytest.raises(autockpt.errors.SaveError):
        mgr.wait_until_finished()
    assert mgr.save(3, {"w": w})  # the failure policy: the first failure of a save() warns ...
    with pytest.raises(autockpt.errors.SaveError):
        mgr.save(4, {"w": w})  # ... the second consecutive one raises


def test_bad_arguments_fail_early(tmp_path: Path) -> None:
    bad: list[dict[str, Any]] = [
        {"max_to_keep": 0}, {"keep_every_n_hours": -1}, {"keep_best": "loss"},
        {"save_interval_steps": 1.5}, {"save_interval_seconds": 0}, {"async_save": "yes"},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidArgumentError, match=next(iter(kwargs))):
            autockpt.CheckpointManager(tmp_path, **kwargs)
    with pytest.raises(InvalidArgumentError, match="mode"):
        autockpt.KeepBest("loss", mode="lowest")  # type: ignore[arg-type]
    mgr = autockpt.CheckpointManager(tmp_path)
    with pytest.raises(InvalidArgumentError, match="step"):
        mgr.save(-1, {})
    with pytest.raises(InvalidArgumentError, match="metric"):
        mgr.save(1, {}, metrics={"loss": "low"})
    with pytest.raises(InvalidArgumentError, match="metadata"):
        mgr.save(1, {}, metadata={"f": object()})
    assert os.listdir(tmp_path) == []


def test_leftovers_of_a_crash_are_cleaned_and_foreign_files_kept(tmp_path: Path) -> None:
    with autockpt.CheckpointManager(tmp_path, dedup=False) as mgr:
        mgr.save(1, {"w": np.ones(2)})
    (tmp_path / ".tmp-step_0000000002-0123abcd").mkdir()
    (tmp_path / ".tmp-step_0000000002-0123abcd" / "tensors.safetensors").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".tmp-user-thing").mkdir()
    autockpt.CheckpointManager(tmp_path)
    listed = sorted(n for n in os.listdir(tmp_path) if not n.startswith(".autockpt-lease-"))
    assert listed == [".tmp-user-thing", "notes.txt", "step_0000000001"]


def test_context_manager_and_close(tmp_path: Path) -> None:
    with autockpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"x": 1})
    with pytest.raises(InvalidArgumentError, match="closed"):
        mgr.save(2, {"x": 2})
    mgr.close()  # idempotent


def test_large_state_is_split_across_files_written_in_parallel(storage: tuple[str, dict[str, Any]]) -> None:
    from safetensors.numpy import load_file

    url, opts = storage
    state = {f"t{i}": np.full((100 + i,), i, np.float32) for i in range(10)}
    with autockpt.CheckpointManager(url, storage_options=opts, dedup=False) as mgr:
        mgr.shard_bytes = 1500  # about four files for this ~4 KB state
        mgr.save(1, state)
    st = Storage(url, opts)
    files = sorted(n.rsplit("/", 1)[-1] for n in st.fs.ls(st.path(step_dirname(1)), detail=False))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and all(f.startswith("tensors-") for f in shards), files
    seen: dict[str, np.ndarray] = {}
    for f in shards:  # each shard is a plain safetensors file
        local = Path(st.path(step_dirname(1), f)) if st.atomic_rename else None
        if local is not None:
            seen.update({k.split("/")[0]: v for k, v in load_file(str(local)).items()})
    if seen:
        assert set(seen) == set(state)
    target = {k: np.zeros_like(v) for k, v in state.items()}
    assert autockpt.CheckpointManager(url, storage_options=opts).restore(target) == 1
    assert all(np.array_equal(target[k], state[k]) for k in state)


def test_async_saves_reuse_staging_and_stay_exact(tmp_path: Path) -> None:
    model, opt, sched = _objects()
    with autockpt.CheckpointManager(tmp_path, async_save=True, max_to_keep=None) as mgr:
        expected = {}
        for step in range(1, 4):
            _train(model, opt, sched, 1)
            mgr.save(step, {"model": model, "opt": opt})
            expected[step] = _snapshot(model)
            _train(model, opt, sched, 1)  # changes while the background write may still run
        mgr.wait_until_finished()
    for step, snap in expected.items():
        saved = autockpt.load(tmp_path, step=step)["model"]
        assert all(torch.equal(saved[k], v) for k, v in snap.items()), step


def test_writer_lease_of_a_live_process_blocks_a_dead_ones_is_cleaned(tmp_path: Path) -> None:
    import json
    import socket
    import subprocess
    import sys

    from autockpt.errors import LeaseError
    from autockpt.lease import LEASE_NAME, _process_start

    with autockpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": np.ones(2)})
    assert not (tmp_path / LEASE_NAME).exists()  # close() released it

    def lease_of(proc: subprocess.Popen[bytes]) -> None:
        (tmp_path / LEASE_NAME).write_text(json.dumps({
            "host": socket.gethostname(), "pid": proc.pid, "start": _process_start(proc.pid),
            "expires": time.time() + 60, "ttl": 60}))

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease_of(live)
        mgr = autockpt.CheckpointManager(tmp_path)
        assert (tmp_path / LEASE_NAME).exists()  # a live writer's lease is never removed
        with pytest.raises(LeaseError, match=f"pid {live.pid}"):
            mgr.save(2, {"w": np.ones(2)})
        assert mgr.restore({"w": np.zeros(2)}) == 1  # reading is always allowed
    finally:
        live.kill()
        live.wait()
    lease_of(live)  # now the lease of a process that is gone
    mgr = autockpt.CheckpointManager(tmp_path)
    assert not (tmp_path / LEASE_NAME).exists()  # a dead writer's lease is a leftover: cleaned at start
    assert mgr.save(2, {"w": np.ones(2)})
    mgr.close()


_RESTORE_RSS = r"""
import sys, torch, autockpt
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
small, big = sys.argv[1], sys.argv[2]
autockpt.CheckpointManager(small).restore({"w": torch.zeros(4)})  # imports and first-use costs, not measured
target = {f"w{i}": torch.full((2**22,), -1.0) for i in range(8)}  # 8 x 16 MiB, touched
before = hwm()
autockpt.CheckpointManager(big).restore(target)
assert all(bool((target[f"w{i}"] == i).all()) for i in range(8))
print(hwm() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_a_restore_holds_no_copy_of_the_checkpoint_in_memory(tmp_path: Path) -> None:
    """Verifying and reading 128 MiB into existing tensors raises the peak resident memory by far less than the
    checkpoint: the file's pages are not all held mapped at once (nor copied into new tensors)."""
    import subprocess
    import sys

    with autockpt.CheckpointManager(tmp_path / "small") as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    with autockpt.CheckpointManager(tmp_path / "big") as mgr:
        mgr.save(1, {f"w{i}": torch.full((2**22,), float(i)) for i in range(8)})
    out = subprocess.run([sys.executable, "-c", _RESTORE_RSS, str(tmp_path / "small"), str(tmp_path / "big")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    grew = int(out.stdout.split()[-1])
    assert grew < 48 * 2**20, f"peak resident memory grew by {grew / 2**20:.0f} MiB restoring a 128 MiB checkpoint"

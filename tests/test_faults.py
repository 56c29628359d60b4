"""Faults on the worst day: a full disk, a writer killed mid-save, flaky S3, a second writer.

Trial counts are scaled for CI; ``AUTOCKPT_FULL=1`` runs the full numbers (200+ crash trials on local disk
and on S3, 100 saves through 10% failing requests). ``python benchmarks/reliability.py`` prints the figures.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import autockpt
from autockpt.errors import LeaseError, SaveError
from autockpt.lease import current_lease, lease_name
from autockpt.reader import open_checkpoint, read_manifest
from autockpt.storage import open_storage as Storage

sys.path.insert(0, str(Path(__file__).parent))
from faultharness import ENV, FAULT_WRITER, crash_trials_local, crash_trials_s3, flaky_saves  # noqa: E402

FULL = os.environ.get("AUTOCKPT_FULL") == "1"


# ----------------------------------------------------------------------------------------- out of space


class FullFileSystem(MemoryFileSystem):
    """An in-memory filesystem that runs out of space at its N-th write operation (mkdir, open for write,
    each write, the close that stores the file, pipe)."""

    protocol = "fullmem"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]
    fail_at: int | None = None
    writes = 0

    @classmethod
    def tick(cls, what: str) -> None:
        cls.writes += 1
        if cls.fail_at is not None and cls.writes == cls.fail_at:
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {what})")

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.tick("makedirs")
        super().makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.tick("mkdir")
        super().mkdir(path, create_parents=create_parents, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self.tick("pipe")
        super().pipe_file(path, value, mode=mode, **kwargs)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            return super()._open(path, mode, *args, **kwargs)
        self.tick("open")
        f = super()._open(path, mode, *args, **kwargs)
        write, commit = f.write, f.commit

        def full_write(data: Any) -> int:
            FullFileSystem.tick("write")
            return int(write(data))

        def full_commit() -> None:
            FullFileSystem.tick("close")
            commit()

        f.write, f.commit = full_write, full_commit
        return f


fsspec.register_implementation("fullmem", FullFileSystem, clobber=True)


def _state(step: int) -> dict[str, Any]:
    return {"w": np.full(5000, step, np.float32), "b": np.arange(3000) + step, "meta": {"step": step}}


def _files_of(url: str, step: int) -> list[str]:
    prefix = url.removeprefix("fullmem://").strip("/") + f"/step_{step:010d}"
    return [k for k in FullFileSystem.store if k.strip("/").startswith(prefix)]


def _intact(url: str, steps: list[int]) -> None:
    storage = Storage(url)
    assert sorted(storage.scan().committed) == steps
    for s in steps:
        with open_checkpoint(storage, s) as ckpt:
            assert ckpt.state()["meta"] == {"step": s}
    assert autockpt.load(url)["meta"] == {"step": steps[-1]}


def out_of_space_sweep() -> dict[str, int]:
    """ENOSPC at each write operation of a save (the lease is held already), raised and warned."""
    FullFileSystem.fail_at = None
    probe = f"fullmem://probe-{uuid.uuid4().hex}"
    with autockpt.CheckpointManager(probe) as mgr:
        mgr.shard_bytes = 16_000  # several payload files
        mgr.save(1, _state(1))
        before = FullFileSystem.writes
        mgr.save(2, _state(2))
        ops = FullFileSystem.writes - before
    assert ops >= 5
    figures = {"ENOSPC injected (fsspec wrapper)": 0}
    for n in range(1, ops + 1):
        for policy in (1, 3):  # raise at once, or warn and go on (the default)
            url = f"fullmem://run-{uuid.uuid4().hex}"
            FullFileSystem.fail_at = None
            mgr = autockpt.CheckpointManager(url, max_to_keep=3, max_consecutive_failures=policy)
            mgr.shard_bytes = 16_000
            assert mgr.save(1, _state(1))
            FullFileSystem.fail_at = FullFileSystem.writes + n
            if policy == 1:
                with pytest.raises(SaveError, match="no space left to save step 2") as info:
                    mgr.save(2, _state(2))
                assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
            else:
                assert mgr.save(2, _state(2)) is False
            figures["ENOSPC injected (fsspec wrapper)"] += 1
            FullFileSystem.fail_at = None
            assert _files_of(url, 2) == [], f"partial files left after ENOSPC at write op {n}"
            _intact(url, [1])
            if policy == 3:  # training went on; the next save, with space again, succeeds
                assert mgr.save(3, _state(3))
                _intact(url, [1, 3])
            mgr.close()
    return figures


def test_out_of_space_at_every_write_of_a_save_keeps_earlier_checkpoints(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="autockpt"):
        figures = out_of_space_sweep()
    assert figures["ENOSPC injected (fsspec wrapper)"] >= 10
    assert any("no space left" in r.getMessage() and "training continues" in r.getMessage() for r in caplog.records)


def test_out_of_space_at_lease_acquisition_is_a_save_error() -> None:
    url = f"fullmem://lease-{uuid.uuid4().hex}"
    mgr = autockpt.CheckpointManager(url, max_consecutive_failures=1)
    FullFileSystem.fail_at = FullFileSystem.writes + 1
    try:
        with pytest.raises(SaveError, match="cannot write"):
            mgr.save(1, _state(1))
    finally:
        FullFileSystem.fail_at = None
    assert mgr.save(1, _state(1))
    mgr.close()


def real_out_of_space(root: Path) -> dict[str, int]:
    """Fill a real 4 MiB tmpfs with checkpoints until ENOSPC; returns figures. Skips if mounting is refused."""
    mnt = root / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the real ENOSPC test needs root")
    try:
        url = str(mnt / "run")
        failures = 0
        mgr = autockpt.CheckpointManager(url, max_to_keep=None, max_consecutive_failures=2)
        big = lambda s: {"w": np.full(300_000, s, np.float32), "meta": {"step": s}}  # noqa: E731
        saved = []
        with pytest.raises(SaveError, match="no space left"):
            for step in range(1, 100):
                if mgr.save(step, big(step)):
                    saved.append(step)
                    continue
                failures += 1  # the first failure warns, the second in a row raises
                lease = lease_name(current_lease(Storage(url))[0])  # type: ignore[index]
                assert sorted(os.listdir(url)) == sorted([f"step_{s:010d}" for s in saved] +
                                                         [lease, "blobs"]), "partial files left"
                assert set(os.listdir(os.path.join(url, "blobs"))) == {  # no partial pack either
                    p for s in saved for p in read_manifest(Storage(url), s)["blobs"]}, "partial pack left"
        failures += 1
        assert failures == 2 and len(saved) >= 2
        assert sorted(n for n in os.listdir(url) if not n.startswith(".autockpt-lease")) == [
            "blobs"] + [f"step_{s:010d}" for s in saved]
        for s in saved:
            with open_checkpoint(Storage(url), s) as ckpt:
                assert ckpt.state()["meta"] == {"step": s}
        mgr.close()
        # lowering max_to_keep frees space: saving works again on the same full disk
        with autockpt.CheckpointManager(url, max_to_keep=1) as mgr2:
            for s in saved[:-1]:
                Storage(url).delete(s)
            assert mgr2.save(saved[-1] + 1, big(saved[-1] + 1))
        return {"ENOSPC hit on a real 4 MiB tmpfs": failures}
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_out_of_space_on_a_small_tmpfs(tmp_path: Path) -> None:
    assert real_out_of_space(tmp_path)["ENOSPC hit on a real 4 MiB tmpfs"] == 2


# ----------------------------------------------------------------------------------------- two writers


def two_writers(url: str, opts: dict[str, Any] | None, endpoint: str) -> None:
    proc = subprocess.Popen([sys.executable, str(FAULT_WRITER), url, endpoint, "1", "1000", "hold"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("holding"):
                break
        else:
            raise AssertionError(proc.stderr.read() if proc.stderr else "writer ended")
        second = autockpt.CheckpointManager(url, storage_options=opts)
        with pytest.raises(LeaseError, match=f"another process is writing checkpoints to .*pid {proc.pid}"):
            second.save(5, {"w": np.zeros(1000, np.float32), "idx": np.zeros(10, np.int64), "meta": None})
        assert second.all_steps() == [1]  # reading is always allowed, and nothing was interleaved
        assert autockpt.load(url, storage_options=opts)["meta"] == {"step": 1}
        target = {"w": np.zeros(1000, np.float32), "idx": np.zeros(10, np.int64), "meta": None}
        assert second.restore(target) == 1 and (target["w"] == 1).all()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # the dead writer was on this host: its lease is taken over at once, without waiting for expiry
        assert second.save(2, {"w": np.full(1000, 2, np.float32), "idx": np.zeros(10, np.int64), "meta": None})
        assert second.all_steps() == [1, 2]
        second.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_second_writer_gets_lease_error_local(tmp_path: Path) -> None:
    two_writers(str(tmp_path / "run"), None, "-")


def test_second_writer_gets_lease_error_s3(s3_server: Any) -> None:
    two_writers(f"s3://{s3_server.new_bucket()}/run", s3_server.storage_options, s3_server.endpoint)


def test_long_lived_reader_sees_a_checkpoint_completed_after_it_listed_the_partial_one(s3_server: Any) -> None:
    """A process that loads, and loads again later (an evaluator, a test), must not trust a directory listing
    cached while another process was still uploading that step (s3fs keeps listings below a prefix until told)."""
    url = f"s3://{s3_server.new_bucket()}/run"
    opts = s3_server.storage_options
    other = {**opts, "skip_instance_cache": True}  # the writer: another process, its own listing cache
    def save(step: int) -> None:
        with autockpt.CheckpointManager(url, storage_options=other) as mgr:
            mgr.save(step, {"w": np.full(4, float(step))})

    save(1)
    fs = fsspec.filesystem("s3", **other)
    fs.pipe_file(f"{url}/step_0000000002/unrelated.bin", b"x")  # step 2 half uploaded: no payload yet
    assert float(autockpt.load(url, storage_options=opts)["w"][0]) == 1.0  # lists (and caches) step 2's dir
    save(2)
    assert float(autockpt.load(url, storage_options=opts)["w"][0]) == 2.0
    assert float(autockpt.load(url, 2, storage_options=opts)["w"][0]) == 2.0


# ----------------------------------------------------------------------------------------- crashes


def _assert_no_damage(figures: Any) -> None:
    bad = {k: v for k, v in figures.items() if v and k.startswith(
        ("checkpoints lost", "corrupt loads", "phantom", "leftovers", "reported saved but missing"))}
    assert bad == {}, dict(figures)


def test_sigkill_during_local_saves(tmp_path: Path) -> None:
    figures = crash_trials_local(tmp_path, 200 if FULL else 40, seed=1)
    _assert_no_damage(figures)
    phases = {k for k in figures if k.startswith("SIGKILL during")}
    assert {"SIGKILL during: payload write", "SIGKILL during: manifest write",
            "SIGKILL during: commit (fsync, rename)", "SIGKILL during: pruning (rename away, unlink, rmdir)"} <= phases


def test_sigkill_during_s3_saves_at_each_kind_of_request(s3_server: Any) -> None:
    # CI: one kill per kind of request
    figures = crash_trials_s3(s3_server.endpoint, s3_server.new_bucket, 200 if FULL else 8, seed=2)
    _assert_no_damage(figures)
    kinds = " ".join(k for k in figures if k.startswith("SIGKILL at HTTP request"))
    for kind in ("payload PUT", "manifest PUT", "DELETE"):
        assert kind in kinds, dict(figures)


# ----------------------------------------------------------------------------------------- flaky S3


def test_saves_through_flaky_s3_lose_nothing_and_report_truthfully(s3_server: Any) -> None:
    figures = flaky_saves(s3_server.endpoint, s3_server.new_bucket, 100 if FULL else 10, rate=0.10, seed=3)
    _assert_no_damage(figures)
    assert figures["faults"] > 0 and figures["saves reported"] > 0

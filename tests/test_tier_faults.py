"""Kills at each phase of a tiered upload, stalled requests, and a zombie writer through the remote tier
(issues 13 and 20). Trial counts are scaled for CI; ``AUTOCKPT_FULL=1`` kills at every phase, twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import autockpt
from autockpt.lease import current_lease
from autockpt.storage import open_storage

sys.path.insert(0, str(Path(__file__).parent))
from faultharness import ENV, crash_trials_tiers  # noqa: E402

ZOMBIE = Path(__file__).parent / "scripts" / "tier_zombie.py"

FULL = os.environ.get("AUTOCKPT_FULL") == "1"


def _assert_no_damage(figures: Any) -> None:
    bad = {k: v for k, v in figures.items() if v and k.startswith(
        ("checkpoints lost", "corrupt loads", "phantom", "restarts that did not", "kept checkpoints not uploaded"))}
    assert bad == {}, dict(figures)


def test_sigkill_at_each_phase_of_an_upload(s3_server: Any, tmp_path: Path, seed: int) -> None:
    figures = crash_trials_tiers(s3_server.endpoint, s3_server.new_bucket, tmp_path, rounds=2 if FULL else 1,
                                 phases=None if FULL else 3, seed=seed)
    print("\n".join(f"{k}: {v}" for k, v in sorted(figures.items())))
    _assert_no_damage(figures)
    assert figures["trials"] >= (20 if FULL else 2), (seed, dict(figures))


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_zombie_writer_paused_mid_upload_commits_and_deletes_nothing_remote(s3_server: Any, tmp_path: Path) -> None:
    """A tiered writer SIGSTOPped in the middle of an upload until its lease expired, a second writer that takes
    over and saves, then SIGCONT: the first uploads, commits and deletes nothing on the remote; everything of the
    second survives and restores."""
    from faultproxy import FaultProxy

    url, opts, ttl = f"s3://{s3_server.new_bucket()}/run", s3_server.storage_options, 2.0
    with FaultProxy(s3_server.endpoint) as proxy:
        proc = subprocess.Popen([sys.executable, str(ZOMBIE), url, str(tmp_path / "z"), proxy.endpoint, str(ttl)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)
        assert proc.stdout is not None and proc.stdin is not None
        try:
            assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)
            proxy.arm(proc.pid, 1, kind="payload PUT", sig=signal.SIGSTOP)  # paused inside step 2's upload
            proc.stdin.write("go\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 60
            while not _stopped(proc.pid):
                assert time.monotonic() < deadline, "the writer never reached its upload"
                time.sleep(0.05)
            assert proxy.killed is not None and "payload PUT" in proxy.killed
            time.sleep(ttl + 0.5)  # its lease expires while it is paused
            new = autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "n", max_to_keep=3)
            for step in (10, 11):
                assert new.save(step, {"w": np.full(2**18, step, np.float32), "meta": {"step": step}})
            assert new.wait_until_finished(timeout=60) and new.durable_step == 11
            held = current_lease(new.storage)
            os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            remote = open_storage(url, {**opts, "skip_instance_cache": True})
            listing = remote.scan()
            # the zombie's step 1 stays (its delete was refused), its steps 2 and 3 were never committed remotely
            assert sorted(listing.committed) == [1, 10, 11], (out, err[-3000:])
            for step in (10, 11):
                target = {"w": np.zeros(2**18, np.float32), "meta": None}
                assert new.restore(target, step=step) == step and (target["w"] == step).all()
                assert autockpt.load(url, step, storage_options=opts)["meta"] == {"step": step}
            assert current_lease(new.storage) == held, "the zombie took or changed the new writer's lease"
            assert "Lease" in out.split("wait ", 1)[1], out  # the zombie is told it is no longer the writer
            new.save(12, {"w": np.full(2**18, 12, np.float32), "meta": {"step": 12}})
            new.close()
            assert sorted(remote.scan().committed) == [10, 11, 12]
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()

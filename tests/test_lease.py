"""One writer per directory (issue 20) and errors at the start (issue 18, items 8 and 9), with real processes.

Writers started at the same instant on a local disk and on the S3 test server: exactly one wins each round,
the others get LeaseError before writing anything. A writer paused (SIGSTOP) past its lease, replaced by a new
writer that saves and prunes, then resumed (SIGCONT): its save raises LeaseError, commits and deletes nothing.
AUTOCKPT_FULL=1 runs 20 rounds of each race instead of 5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autockpt
from autockpt.errors import LeaseError, StorageAccessError
from autockpt.lease import current_lease
from autockpt.storage import open_storage

WORKER = Path(__file__).parent / "scripts" / "lease_worker.py"
FULL = os.environ.get("AUTOCKPT_FULL") == "1"
ROUNDS = 20 if FULL else 5
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                     os.environ.get("PYTHONPATH", "")])}


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)


def race(urls: list[str], opts: dict[str, Any] | None, writers: int) -> None:
    procs = [_spawn(str(i), json.dumps(opts), "race") for i in range(writers)]
    try:
        for rnd, url in enumerate(urls):
            at = time.time() + 0.5  # every worker waits for this instant, then saves
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"go {url} {at}\n")
                p.stdin.flush()
            results = []
            for p in procs:
                assert p.stdout is not None
                results.append(p.stdout.readline().strip())
            winners = [i for i, r in enumerate(results) if r == "won"]
            assert len(winners) == 1, f"round {rnd}: {results}"
            assert all(r.startswith("lease another process is writing") for i, r in enumerate(results)
                       if i != winners[0]), f"round {rnd}: {results}"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("end\n")
                p.stdin.flush()
            storage = open_storage(url, opts)
            listing = storage.scan()
            # the losers wrote nothing: only the winner's checkpoint, no partial or temporary files
            assert sorted(listing.committed) == [winners[0] + 1], f"round {rnd}: {listing}"
            assert listing.uncommitted == [] and listing.temporary == [], f"round {rnd}: {listing}"
            assert autockpt.load(url, storage_options=opts)["meta"]["writer"] == winners[0]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.mark.parametrize("writers", [2, 5])
def test_writers_started_at_once_exactly_one_wins_local(tmp_path: Path, writers: int) -> None:
    race([str(tmp_path / f"run{r}") for r in range(ROUNDS)], None, writers)


@pytest.mark.parametrize("writers", [2, 5])
def test_writers_started_at_once_exactly_one_wins_s3(s3_server: Any, writers: int) -> None:
    bucket = s3_server.new_bucket()
    race([f"s3://{bucket}/run{r}" for r in range(ROUNDS)], s3_server.storage_options, writers)


def zombie(url: str, opts: dict[str, Any] | None) -> None:
    ttl = 2.0
    proc = _spawn("0", json.dumps(opts), "zombie", url, str(ttl))
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(ttl + 0.5)  # its lease expires while it is paused
        new = autockpt.CheckpointManager(url, storage_options=opts, max_to_keep=1)
        assert new.save(10, {"w": np.full(64, 10, np.float32), "meta": {"step": 10, "writer": 1}})
        assert new.save(11, {"w": np.full(64, 11, np.float32), "meta": {"step": 11, "writer": 1}})
        assert new.all_steps() == [11]  # it pruned the paused writer's checkpoint 2 and its own 10
        held = current_lease(new.storage)
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = proc.stdout.readline().strip()
        assert out.startswith("lease the writer lease of"), out
        assert proc.wait(timeout=30) == 0
        storage = open_storage(url, opts)
        listing = storage.scan()
        assert sorted(listing.committed) == [11] and listing.uncommitted == [] and listing.temporary == [], listing
        target = {"w": np.zeros(64, np.float32), "meta": None}
        assert new.restore(target) == 11 and (target["w"] == 11).all()
        now = current_lease(storage)  # the resumed writer did not take or release the new writer's lease
        assert held is not None and now is not None and now[0] == held[0] and now[1] is not None, (held, now)
        assert held[1] is not None and now[1]["token"] == held[1]["token"] and not now[1].get("released"), now
        assert new.save(12, {"w": np.full(64, 12, np.float32), "meta": {"step": 12, "writer": 1}})
        new.close()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()


def test_writer_paused_past_its_lease_commits_and_deletes_nothing_local(tmp_path: Path) -> None:
    zombie(str(tmp_path / "run"), None)


def test_writer_paused_past_its_lease_commits_and_deletes_nothing_s3(s3_server: Any) -> None:
    zombie(f"s3://{s3_server.new_bucket()}/run", s3_server.storage_options)


# ----------------------------------------------------------------------------------------- issue 18, 8 and 9


def _holder(url: Path) -> subprocess.Popen[str]:
    """A process that holds the writer lease of ``url`` (for 60 s at most)."""
    first = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, autockpt; m = autockpt.CheckpointManager(sys.argv[1]); m.acquire(); print('held', "
        "flush=True); time.sleep(60)"), str(url)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert first.stdout is not None and first.stdout.readline().strip() == "held"
    return first


def test_second_writer_fails_on_entry_to_resume_before_restoring(tmp_path: Path) -> None:
    import torch

    with autockpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, {"model": torch.nn.Linear(2, 2)})
    first = _holder(tmp_path / "run")
    try:
        model = torch.nn.Linear(2, 2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(LeaseError, match=f"pid {first.pid}"):
            with autockpt.resume(tmp_path / "run", model=model):
                raise AssertionError("entered the loop")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing restored
    finally:
        first.kill()
        first.wait()


def test_second_writer_fails_on_entry_to_keras_fit_before_training(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    from autockpt.integrations.keras import AutoCheckpoint

    first = _holder(tmp_path / "run")
    try:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        before = [w.copy() for w in model.get_weights()]
        x, y = np.ones((8, 3), np.float32), np.ones((8, 1), np.float32)
        with pytest.raises(LeaseError, match=f"pid {first.pid}"):
            model.fit(x, y, epochs=2, verbose=0, callbacks=[AutoCheckpoint(tmp_path / "run")])
        assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))  # not trained
    finally:
        first.kill()
        first.wait()


def test_second_writer_fails_on_entry_to_lightning_fit_before_training(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    import torch

    from autockpt.integrations.lightning import AutoCheckpoint

    class Tiny(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.steps = 0

        def training_step(self, batch: Any, i: int) -> Any:
            self.steps += 1
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    first = _holder(tmp_path / "run")
    try:
        module = Tiny()
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 3)), batch_size=4)
        trainer = pl.Trainer(max_epochs=1, callbacks=[AutoCheckpoint(tmp_path / "run")], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", default_root_dir=tmp_path)
        with pytest.raises(LeaseError, match=f"pid {first.pid}"):
            trainer.fit(module, data)
        assert module.steps == 0
    finally:
        first.kill()
        first.wait()


def test_a_path_that_is_a_file_fails_in_the_constructor(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.write_text("not a directory")
    with pytest.raises(StorageAccessError, match="is a file, not a directory") as e:
        autockpt.CheckpointManager(path)
    assert "does not exist" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "autockpt", "ls", str(path)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "is a file" in r.stderr and "does not exist" not in r.stderr, r.stderr


def test_a_read_only_directory_fails_when_the_writer_starts(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through file modes: a read-only mount
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs")
    else:
        ro.chmod(0o555)
    try:
        mgr = autockpt.CheckpointManager(ro / "run")  # a reader may use a read-only directory
        t0 = time.monotonic()
        with pytest.raises(StorageAccessError, match="read-only or not writable"):
            mgr.acquire()
        with pytest.raises(StorageAccessError):  # the first save raises too: permanent, not "warn and continue"
            mgr.save(1, {"w": np.ones(2)})
        assert time.monotonic() - t0 < 5  # not retried
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)


def _no_credentials_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in ENV.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    return env


def test_missing_s3_credentials_fail_when_the_writer_starts_and_in_the_cli(s3_server: Any, tmp_path: Path) -> None:
    url = f"s3://{s3_server.new_bucket()}/run"
    opts = {"client_kwargs": s3_server.storage_options["client_kwargs"]}
    code = ("import json, sys, time, autockpt\n"
            "from autockpt.errors import StorageAccessError\n"
            "t0 = time.monotonic()\n"
            "try:\n"
            "    autockpt.CheckpointManager(sys.argv[1], storage_options=json.loads(sys.argv[2])).acquire()\n"
            "except StorageAccessError as e:\n"
            "    print('StorageAccessError', round(time.monotonic() - t0), e)\n")
    r = subprocess.run([sys.executable, "-c", code, url, json.dumps(opts)], capture_output=True, text=True,
                       env=_no_credentials_env(tmp_path), timeout=120)
    assert r.stdout.startswith("StorageAccessError"), r.stdout + r.stderr
    assert "no credentials" in r.stdout and int(r.stdout.split()[1]) < 5, r.stdout  # not retried
    r = subprocess.run([sys.executable, "-m", "autockpt", "ls", url, "--storage-options", json.dumps(opts)],
                       capture_output=True, text=True, env=_no_credentials_env(tmp_path), timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no credentials" in r.stderr, r.stderr


def test_ls_shows_who_holds_the_lease_and_until_when(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    with autockpt.CheckpointManager(url) as mgr:
        mgr.save(1, {"w": np.ones(2)})
        r = subprocess.run([sys.executable, "-m", "autockpt", "ls", url], capture_output=True, text=True, env=ENV)
        line = r.stdout.strip().splitlines()[-1]
        assert line.startswith("writer lease: generation 1, host ") and f"pid {os.getpid()} (until " in line, line
        assert "expires in" in line, line
    r = subprocess.run([sys.executable, "-m", "autockpt", "ls", url], capture_output=True, text=True, env=ENV)
    assert r.stdout.strip().splitlines()[-1].startswith("writer lease: generation 1, released by host"), r.stdout


def test_without_an_atomic_create_one_warning_at_start(caplog: pytest.LogCaptureFixture) -> None:
    url = f"dir::memory://autockpt-tests/{uuid.uuid4().hex}"  # a wrapper filesystem: no atomic create
    with caplog.at_level("WARNING", logger="autockpt"):
        with autockpt.CheckpointManager(url) as mgr:
            mgr.save(1, {"w": np.ones(2)})
            mgr.save(2, {"w": np.ones(2)})
    said = [r.getMessage() for r in caplog.records if "no atomic create" in r.getMessage()]
    assert len(said) == 1, said


def test_lease_options_are_checked_in_the_constructor(tmp_path: Path) -> None:
    from autockpt.errors import InvalidArgumentError

    for bad in ({"lease_ttl": 0}, {"lease_ttl": None}, {"lease_ttl": "30"}, {"lease_renew_seconds": -1},
                {"lease_ttl": 30, "lease_renew_seconds": 25}):
        with pytest.raises(InvalidArgumentError, match="lease_"):
            autockpt.CheckpointManager(tmp_path / "run", **bad)  # type: ignore[arg-type]
    with autockpt.CheckpointManager(tmp_path / "run", lease_ttl=6, lease_renew_seconds=1) as mgr:
        mgr.acquire()
        lease = current_lease(mgr.storage)
        assert lease is not None and lease[1] is not None and lease[1]["ttl"] == 6


def test_a_collector_that_lost_the_lease_deletes_nothing(tmp_path: Path) -> None:
    """Issue 20 with dedup's collector: a writer paused past its lease (here: its heartbeat stopped, as a pause
    stops it) must not sweep the packs of its successor — not even the temporary pack of a save in flight."""
    from autockpt.collect import collect
    from autockpt.storage import BLOBS_DIR

    url = str(tmp_path / "run")
    old = autockpt.CheckpointManager(url, lease_ttl=1.0, max_to_keep=1)
    old.acquire()
    old._lease._stop.set()  # paused: no more renewals
    assert old._lease._thread is not None
    old._lease._thread.join()
    time.sleep(1.3)  # its lease expires
    new = autockpt.CheckpointManager(url, max_to_keep=1)
    assert new.save(1, {"frozen": np.ones(256, np.float32), "w": np.full(8, 1, np.float32)})
    assert new.save(2, {"frozen": np.ones(256, np.float32), "w": np.full(8, 2, np.float32)})
    in_flight = tmp_path / "run" / BLOBS_DIR / ".tmp-step_0000000003-deadbeef-000.safetensors"
    in_flight.write_bytes(b"a save of the new writer, in progress")
    before = sorted(os.listdir(tmp_path / "run" / BLOBS_DIR))
    with pytest.raises(LeaseError):
        collect(old.storage)
    assert sorted(os.listdir(tmp_path / "run" / BLOBS_DIR)) == before, "the old writer's collector deleted packs"
    target = {"frozen": np.zeros(256, np.float32), "w": np.zeros(8, np.float32)}
    assert new.restore(target) == 2 and (target["w"] == 2).all() and (target["frozen"] == 1).all()
    new.close()


def test_the_start_up_cleanup_runs_under_the_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: a new manager removes the leftovers it finds (partial steps, unreferenced packs) only while it
    holds the writer lease. Here the old writer, paused past its lease with a save in flight, wakes up at the
    moment the new manager starts deleting: it must find the lease taken (fenced), not take it back and then see
    the files of its save deleted under it."""
    from autockpt.storage import BLOBS_DIR
    from autockpt.storage.local import LocalStorage

    url = tmp_path / "run"
    old = autockpt.CheckpointManager(url, lease_ttl=1.0, max_to_keep=1)
    assert old.save(1, {"w": np.full(8, 1, np.float32)})
    old._lease._stop.set()  # paused: no more renewals
    assert old._lease._thread is not None
    old._lease._thread.join()
    pack = url / BLOBS_DIR / "0123456789abcdef0123456789abcdef.safetensors"
    in_flight = [url / ".tmp-step_0000000002-deadbeef", pack]
    in_flight[0].mkdir()
    (in_flight[0] / "tensors.safetensors").write_bytes(b"half a payload")
    in_flight[1].write_bytes(b"a pack of step 2, its manifest not committed yet")
    time.sleep(1.3)  # its lease expires
    woke: list[str] = []
    real = LocalStorage.cleanup

    def cleanup_as_the_old_writer_wakes(self: LocalStorage, listing: Any) -> None:
        if not woke:  # the old writer renews (takes the next generation if nobody holds the lease) right now
            try:
                old._lease.check()
                woke.append("took the lease back")
            except LeaseError:
                woke.append("fenced")
        real(self, listing)

    monkeypatch.setattr(LocalStorage, "cleanup", cleanup_as_the_old_writer_wakes)
    new = autockpt.CheckpointManager(url, max_to_keep=1)
    assert woke == ["fenced"], "the new manager deleted files while the old writer could take the lease back"
    assert not any(p.exists() for p in in_flight)  # removed, under the new manager's lease
    with pytest.raises(LeaseError):
        old.save(3, {"w": np.full(8, 3, np.float32)})
    target = {"w": np.zeros(8, np.float32)}
    assert new.restore(target) == 1 and (target["w"] == 1).all()
    assert new.save(4, {"w": np.full(8, 4, np.float32)})
    new.close()


def test_a_writer_paused_inside_its_collector_deletes_none_of_its_successors_packs(tmp_path: Path) -> None:
    """Issue 20 with dedup's collector, real processes and signals: a deduplicating writer is stopped (SIGSTOP) as
    the collection after its save starts, past its lease; a successor takes over, saves and prunes, and is stopped
    with the packs of its next save written but its manifest not yet committed. The old writer is continued: its
    collector lists those packs, which no manifest refers to yet, and must delete none of them (LeaseError). Then
    the successor commits, and every checkpoint it wrote verifies and restores."""
    from autockpt.reader import open_checkpoint
    from autockpt.storage import BLOBS_DIR

    url, ttl = str(tmp_path / "run"), 1.5
    old = _spawn("0", "null", "collector", url, str(ttl))
    new: subprocess.Popen[str] | None = None
    try:
        assert old.stdout is not None and old.stdout.readline().strip() == "collecting"
        time.sleep(ttl + 0.3)  # its lease runs out while it is stopped inside its collector
        new = _spawn("1", "null", "successor", url)
        assert new.stdout is not None and new.stdout.readline().strip() == "committing"
        packs = sorted(os.listdir(tmp_path / "run" / BLOBS_DIR))  # step 12's packs are among them, unreferenced
        os.kill(old.pid, signal.SIGCONT)
        out = old.stdout.readline().strip()
        assert old.wait(timeout=60) == 0
        assert sorted(os.listdir(tmp_path / "run" / BLOBS_DIR)) == packs, "the old writer's collector deleted packs"
        assert out.startswith("lease the writer lease of"), out
        os.kill(new.pid, signal.SIGCONT)
        assert new.stdout.readline().strip() == "saved"
        assert new.wait(timeout=60) == 0
        storage = open_storage(url)
        assert sorted(storage.scan().committed) == [12]
        with open_checkpoint(storage, 12) as ckpt:  # verifies every referenced byte
            state = ckpt.state()
        assert state["meta"] == {"step": 12, "writer": 1} and (state["new"] == 12).all()
        assert (state["frozen"] == np.arange(4096, dtype=np.float32)).all()
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()

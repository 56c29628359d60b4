"""The fast local tier in front of a durable remote one (issue 13): uploads, retention per tier, restore across
tiers, remote outages, kills during uploads, preemption. Remote: the moto S3 server of tests/conftest.py (or a
test's own instance, for outages). Long variants under ``AUTOCKPT_FULL=1``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autockpt
from autockpt.errors import InvalidArgumentError
from autockpt.storage import open_storage

sys.path.insert(0, str(Path(__file__).parent))
from conftest import start_moto  # noqa: E402

FULL = os.environ.get("AUTOCKPT_FULL") == "1"
SCRIPT = Path(__file__).parent / "scripts" / "tiers_train.py"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def remote_steps(url: str, opts: dict[str, Any]) -> list[int]:
    """What a fresh reader (no listing cache shared with the manager under test) finds committed on S3."""
    return sorted(open_storage(url, {**opts, "skip_instance_cache": True}).scan().committed)


def local_steps(local: Path) -> list[int]:
    return sorted(open_storage(str(local)).scan().committed)


def test_save_uploads_and_each_tier_keeps_its_own(s3_url: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, opts = s3_url
    w = torch.zeros(8)
    with autockpt.CheckpointManager(url, max_to_keep=3, storage_options=opts, local_dir=tmp_path / "l",
                                    local_max_to_keep=2) as mgr:
        for step in range(1, 7):
            w.fill_(step)
            assert mgr.save(step, {"w": w})
        assert mgr.wait_until_finished(timeout=60)
        assert mgr.durable_step == 6
    assert remote_steps(url, opts) == [4, 5, 6]
    assert local_steps(tmp_path / "l") == [5, 6]
    assert float(autockpt.load(url, storage_options=opts)["w"][0]) == 6.0  # the remote copy alone verifies


def test_without_local_dir_durable_step_is_the_latest(tmp_path: Path) -> None:
    with autockpt.CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(3, {"w": np.ones(2)})
        assert mgr.wait_until_finished() and mgr.durable_step == mgr.latest_step == 3


def test_bad_tier_options_raise_early(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="local_max_to_keep"):
        autockpt.CheckpointManager(tmp_path / "r", local_dir=tmp_path / "l", local_max_to_keep=0)
    with pytest.raises(InvalidArgumentError, match="upload_deadline_s"):
        autockpt.CheckpointManager(tmp_path / "r", local_dir=tmp_path / "l", upload_deadline_s=-1)
    with pytest.raises(InvalidArgumentError, match="local_dir must be a path on a local filesystem"):
        autockpt.CheckpointManager(tmp_path / "r", local_dir="memory://x/y")


def test_local_dir_of_another_remote_is_refused(tmp_path: Path) -> None:
    with autockpt.CheckpointManager("memory://tiers-a/run", local_dir=tmp_path / "l") as mgr:
        mgr.save(1, {"w": np.ones(2)})
    with pytest.raises(InvalidArgumentError, match="holds checkpoints of 'memory://tiers-a/run'"):
        autockpt.CheckpointManager("memory://tiers-b/run", local_dir=tmp_path / "l")


def _train(url: str, opts: dict[str, Any], local: Path, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with autockpt.resume(url, model=model, optimizer=opt, every_n_steps=5, catch_sigint=False,
                         storage_options=opts, local_dir=local, local_max_to_keep=1) as run:
        for _ in run.steps(steps):
            opt.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
    return model


def test_machine_lost_resumes_from_remote_bit_identical(s3_server: Any, tmp_path: Path) -> None:
    opts = s3_server.storage_options
    straight = _train(f"s3://{s3_server.new_bucket()}/run", opts, tmp_path / "l0", 30)
    url = f"s3://{s3_server.new_bucket()}/run"
    _train(url, opts, tmp_path / "l1", 17)  # ends with step 17 saved and uploaded (close waits)
    shutil.rmtree(tmp_path / "l1")  # the machine is gone with its disk
    resumed = _train(url, opts, tmp_path / "l2", 30)  # a fresh machine, an empty local dir
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dedup", [False, True])
def test_damaged_local_copy_falls_back_to_remote(s3_url: tuple[str, dict[str, Any]], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture, dedup: bool) -> None:
    url, opts = s3_url
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l", dedup=dedup) as mgr:
        mgr.save(4, {"w": torch.full((1000,), 4.0)})
    # deduplicated: the local pack the checkpoint's tensors lie in
    payload = (next((tmp_path / "l" / "blobs").iterdir()) if dedup else
               tmp_path / "l" / "step_0000000004" / "tensors.safetensors")
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0xFF
    payload.write_bytes(bytes(data))
    w = torch.zeros(1000)
    with caplog.at_level(logging.WARNING, "autockpt"), \
            autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l") as mgr:
        assert mgr.restore({"w": w}) == 4
    assert torch.equal(w, torch.full((1000,), 4.0))
    assert any("does not verify" in r.message and str(tmp_path / "l") in r.message for r in caplog.records)


def test_local_only_checkpoint_after_a_crash_is_restored_and_uploaded(s3_url: tuple[str, dict[str, Any]],
                                                                      tmp_path: Path) -> None:
    url, opts = s3_url
    code = (  # the process dies as soon as the local save returned: its 32 MB upload has barely begun
        "import os, sys, numpy as np, autockpt\n"
        f"mgr = autockpt.CheckpointManager({url!r}, storage_options={opts!r}, local_dir={str(tmp_path / 'l')!r})\n"
        "mgr.save(7, {'w': np.full(2**22, 7.0)})\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=120)
    assert local_steps(tmp_path / "l") == [7] and remote_steps(url, opts) == []
    w = np.zeros(2**22)
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l") as mgr:
        assert mgr.restore({"w": w}) == 7
        assert mgr.wait_until_finished(timeout=60) and mgr.durable_step == 7
    assert (w == 7.0).all() and remote_steps(url, opts) == [7]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bucket(endpoint: str, name: str) -> None:
    import botocore.session

    botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)


def test_remote_outage_training_goes_on_and_the_backlog_uploads(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server = start_moto(port)
    try:
        _bucket(endpoint, "outage")
        url = "s3://outage/run"
        w = torch.zeros(100)
        with caplog.at_level(logging.WARNING, "autockpt"):
            mgr = autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l", max_to_keep=3,
                                             local_max_to_keep=1)
            mgr.save(1, {"w": w})
            assert mgr.wait_until_finished(timeout=60) and mgr.durable_step == 1
            server.terminate()
            server.wait(timeout=10)  # the remote is gone (and, moto being in memory, its contents with it)
            for step in range(2, 8):
                w.fill_(step)
                assert mgr.save(step, {"w": w}), "a save must not fail while only the remote is down"
            assert mgr.wait_until_finished(timeout=0.5) is False
            assert set(local_steps(tmp_path / "l")) >= {5, 6, 7}, "nothing the policy keeps may be lost"
            server = start_moto(port)
            _bucket(endpoint, "outage")
            assert mgr.wait_until_finished(timeout=120)
            mgr.close()
        assert {5, 6, 7} <= set(remote_steps(url, opts))
        assert local_steps(tmp_path / "l") == [7]
        backlog = [r for r in caplog.records if "wait in" in r.message and "to come back" in r.message]
        assert len(backlog) == 1, [r.message for r in caplog.records]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_sigkill_during_uploads_loses_nothing(s3_server: Any, tmp_path: Path, seed: int) -> None:
    """Kill -9 at random moments of a run that uploads: the next start restores a verified newest checkpoint,
    the remote never holds a partial one that restores, and the backlog finishes uploading."""
    rng = random.Random(seed)
    opts = s3_server.storage_options
    url = f"s3://{s3_server.new_bucket()}/run"
    local = tmp_path / "l"
    for _trial in range(6 if FULL else 2):
        proc = subprocess.Popen([sys.executable, str(SCRIPT), url, str(local), s3_server.endpoint, "8", "3",
                                 "1000000"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        want = rng.randint(4, 14)  # steps after this start's restored one
        for n, _line in enumerate(proc.stdout, 1):
            if n == want:
                break
        time.sleep(rng.uniform(0, 0.5))
        proc.kill()
        proc.wait(timeout=30)
        for s in remote_steps(url, opts):  # every committed remote checkpoint verifies on its own
            assert float(autockpt.load(url, s, storage_options=opts)["big"][0]) == s, f"seed {seed} step {s}"
    newest = max(local_steps(local) + remote_steps(url, opts))
    state = autockpt.load(url, storage_options=opts, local_dir=local)  # verified, local copy first
    assert float(state["big"][0]) == newest, f"seed {seed}"
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=local, max_to_keep=3) as mgr:
        assert mgr.latest_step == newest, f"seed {seed}"
        assert mgr.wait_until_finished(timeout=120) and mgr.durable_step == newest, f"seed {seed}"
    assert newest in remote_steps(url, opts), f"seed {seed}"


def test_sigterm_final_checkpoint_is_durable_before_exit(s3_url: tuple[str, dict[str, Any]], tmp_path: Path,
                                                         s3_server: Any) -> None:
    url, opts = s3_url
    mb = "1024" if FULL else "48"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), url, str(tmp_path / "l"), s3_server.endpoint, mb,
                             "1000000", "1000000"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.decode().strip() == "step 5":
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err.decode()[-3000:]
    line = [x for x in err.decode().splitlines() if "SIGTERM: saved step" in x]
    assert len(line) == 1 and f"(durable on {url} after" in line[0], err.decode()[-3000:]
    step = int(line[0].split("saved step ")[1].split()[0])
    assert remote_steps(url, opts) == [step]
    assert float(autockpt.load(url, storage_options=opts)["big"][-1]) == step


# ------------------------------------------------------------------------------------- property test
_OPS = st.lists(st.sampled_from(["save", "save", "save", "crash", "lose"]), min_size=4, max_size=10)


@settings(max_examples=30 if FULL else 3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_two_tier_retention_invariants(ops: list[str], s3_server: Any, tmp_path_factory: Any) -> None:
    """Random saves, crashes (the uploader stopped mid-way, the manager dropped unclosed) and machine losses (the
    local dir deleted) under max_to_keep=2, local_max_to_keep=1: the newest save stays local, what the remote
    policy keeps is never lost unless the machine holding it was, local copies stay bounded, and in the end
    everything kept is uploaded and the newest restores. (Remote outages: the test above.)"""
    good = s3_server.storage_options
    url = f"s3://{s3_server.new_bucket()}/run"
    local = tmp_path_factory.mktemp("tiers")
    opts, step, lost_upto = good, 0, 0
    saved: list[int] = []
    mgr = autockpt.CheckpointManager(url, storage_options=opts, local_dir=local, max_to_keep=2,
                                     local_max_to_keep=1, max_consecutive_failures=100)
    for op in ops:
        if op == "save":
            step += 1
            assert mgr.save(step, {"w": np.full(2, float(step))}), ops
            saved.append(step)
            assert step in local_steps(local), f"{ops}: the newest save must stay local"
        else:
            mgr.storage.close()  # the process dies: its uploader stops mid-way, nothing is finished
            mgr._lease.release()
            if op == "lose":
                shutil.rmtree(local, ignore_errors=True)
                lost_upto = step
            mgr = autockpt.CheckpointManager(url, storage_options=opts, local_dir=local, max_to_keep=2,
                                             local_max_to_keep=1, max_consecutive_failures=100)
        here = set(local_steps(local))  # first: a local copy goes only once its upload is committed
        on_remote = set(remote_steps(url, good))
        kept = set(saved[-2:])
        for s in kept - on_remote - here:
            assert s <= lost_upto, f"{ops}: step {s}, which the policy keeps, was lost"
        assert len(here) <= 1 + len(kept - on_remote) + 1, f"{ops}: local copies pile up beyond the bound"
    mgr.close()
    mgr = autockpt.CheckpointManager(url, storage_options=good, local_dir=local, max_to_keep=2, local_max_to_keep=1)
    assert mgr.wait_until_finished(timeout=60)
    if saved and (saved[-1] > lost_upto or saved[-1] in on_remote):
        assert mgr.restore({"w": np.zeros(2)}) == saved[-1], ops
    mgr.close()
    assert set(remote_steps(url, good)) >= {s for s in saved[-2:] if s > lost_upto}, ops


def _rows(out: str) -> list[str]:
    """The table rows of `autockpt ls` (not its header, nor the writer-lease line under the table)."""
    return [line for line in out.splitlines()[1:] if not line.startswith("writer lease:")]


def test_cli_sync_uploads_a_backlog_and_ls_shows_where(s3_url: tuple[str, dict[str, Any]], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from autockpt.cli import main

    url, opts = s3_url
    local = tmp_path / "l"
    # a backlog left in a local dir (self-contained, as a tiered run writes them: tiers do not deduplicate)
    with autockpt.CheckpointManager(local, max_to_keep=None, dedup=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": np.full(4, float(step))})
    flags = ["--storage-options", __import__("json").dumps({**opts, "skip_instance_cache": True})]
    assert main(["ls", url, "--local-dir", str(local), *flags]) == 0
    assert [line.split()[-1] for line in _rows(capsys.readouterr().out)] == ["local"] * 3
    assert main(["sync", str(local), url, *flags]) == 0
    assert "uploaded 3 checkpoint(s)" in capsys.readouterr().out
    assert remote_steps(url, opts) == [1, 2, 3]
    assert local_steps(local) == [2, 3]  # durable now: the local tier keeps its local_max_to_keep=2 newest
    assert main(["ls", url, "--local-dir", str(local), *flags]) == 0
    assert [line.split()[-1] for line in _rows(capsys.readouterr().out)] == ["remote", "both", "both"]


def test_local_dir_under_a_torch_distributed_process_group_uploads(tmp_path: Path) -> None:
    """A process group (here of one rank) with local_dir: the ranks share the remote tier (this used to raise)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        with autockpt.CheckpointManager(tmp_path / "r", local_dir=tmp_path / "l") as mgr:
            assert mgr.storage.grouped
            mgr.save(1, {"x": torch.arange(3.0)})
            assert mgr.wait_until_finished(timeout=30) and mgr.durable_step == 1
        assert float(autockpt.load(tmp_path / "r")["x"][2]) == 2.0
    finally:
        dist.destroy_process_group()

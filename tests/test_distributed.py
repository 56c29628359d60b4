"""torch.distributed: real gloo process groups of 2 and 4 CPU processes, real files, real signals.

Each test launches ``tests/scripts/dist_worker.py`` once per rank with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), under a hard timeout; every rank writes what it saw to a JSON
file and the test compares the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import autockpt  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "dist_worker.py"
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 150


def _listed(ckpt: Path) -> list[str]:
    """The checkpoint directory's entries but the writer lease's generation files (kept on purpose)."""
    return sorted(n for n in os.listdir(ckpt) if not n.startswith(".autockpt-lease-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Group:
    """The processes of one launched group."""

    def __init__(self, scenario: str, n: int, out: Path, ckpt: Path | str, arg: str = "") -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        port = _free_port()
        self.procs = []
        for rank in range(n):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
            self.procs.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), scenario, str(out), str(ckpt), arg], env=env,
                stdout=open(out / f"log-{rank}.txt", "w"), stderr=subprocess.STDOUT,
            ))

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the process group did not finish within {timeout} s (a hang):\n{self.logs()}")
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- rank {r}\n{(self.out / f'log-{r}.txt').read_text()[-3000:]}"
                         for r in range(len(self.procs)))

    def results(self, ranks: list[int] | None = None) -> list[dict[str, Any]]:
        ranks = list(range(len(self.procs))) if ranks is None else ranks
        out = []
        for r in ranks:
            path = self.out / f"result-{r}.json"
            assert path.exists(), f"rank {r} wrote no result:\n{self.logs()}"
            out.append(json.loads(path.read_text()))
        return out


def run(scenario: str, n: int, out: Path, ckpt: Path | str, arg: str = "") -> list[dict[str, Any]]:
    g = Group(scenario, n, out, ckpt, arg)
    codes = g.wait()
    assert codes == [0] * n, f"exit codes {codes}:\n{g.logs()}"
    return g.results()


def step_files(ckpt: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in sorted(ckpt.iterdir()) if d.name.startswith("step_")}


def test_replicated_state_one_writer_and_agreed_restore(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    res = run("ddp", 2, tmp_path / "out", ckpt)
    files = step_files(ckpt)
    assert sorted(files) == [f"step_{s:010d}" for s in (1, 2, 3)]
    for names in files.values():  # rank 0 alone wrote the (replicated) tensors
        assert names == {"manifest.json", "rank-00000.safetensors"}
    assert _listed(ckpt) == sorted(files)  # no temporary directory, no probe file left
    for r in res:
        assert r["saved"] == [True, True, True]
        assert r["latest"] == 3 and r["restored"] == 3
        assert r["fresh"] != r["weights"]
        assert r["weights_after"] == r["weights"] == res[0]["weights"]
        assert r["momentum_equal"]


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.full)])
def test_sharded_save_has_every_rank_s_shards_and_reshards_on_load(tmp_path: Path, n: int) -> None:
    """FSDP2 (fully_shard) on N ranks; restore on N/2 (or 2N) and save there in the background: same full tensors."""
    a, b = tmp_path / "a", tmp_path / "b"
    saved = run("fsdp_save", n, tmp_path / "o1", a)
    (names,) = step_files(a).values()
    assert names == {"manifest.json"} | {f"rank-{r:05d}.safetensors" for r in range(n)}
    m = 2 if n == 4 else 4
    other = run("fsdp_restore", m, tmp_path / "o2", a, str(b))
    assert all(r["restored"] == 2 for r in other)
    assert other[0]["fresh"] != saved[0]["full"]
    assert other[0]["full"] == saved[0]["full"]  # N -> N/2 or N -> 2N
    (names_b,) = step_files(b).values()
    assert names_b == {"manifest.json"} | {f"rank-{r:05d}.safetensors" for r in range(m)}
    if n == 2:  # the async save on 4 ranks restored on 2 (4 -> 2 -> 4 is covered by the n=4 case above)
        back = run("fsdp_restore", n, tmp_path / "o3", b)
        assert back[0]["full"] == saved[0]["full"]
    # Without a model, autockpt.load assembles the full tensors from the shards.
    state = autockpt.load(str(a))
    for name, value in state["model"].items():
        assert value.tolist() == saved[0]["full"][f"p/{name}"]


@pytest.fixture(scope="module")
def fsdp2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded checkpoint saved by 2 ranks (step 2); tests copy it before damaging it."""
    base = tmp_path_factory.mktemp("fsdp2")
    run("fsdp_save", 2, base / "out", base / "ckpt")
    return base / "ckpt"


def test_checkpoint_with_a_missing_shard_is_never_chosen(tmp_path: Path, fsdp2_ckpt: Path) -> None:
    a = tmp_path / "a"
    shutil.copytree(fsdp2_ckpt, a)
    (d,) = [p for p in a.iterdir() if p.name.startswith("step_")]
    (d / "rank-00001.safetensors").unlink()
    with pytest.raises(autockpt.errors.CheckpointNotFoundError):
        autockpt.load(str(a))
    manifest = json.loads((d / "manifest.json").read_text())["body"]
    assert any(t.get("file") == "rank-00001.safetensors" and "shard_of" in t for t in manifest["tensors"].values())


def test_manifest_without_a_shard_does_not_verify(tmp_path: Path, fsdp2_ckpt: Path) -> None:
    """A manifest (with a valid checksum) that lists rank 0's shards only does not cover the tensors."""
    from autockpt.format import dump_manifest

    a = tmp_path / "a"
    shutil.copytree(fsdp2_ckpt, a)
    (d,) = [p for p in a.iterdir() if p.name.startswith("step_")]
    body = json.loads((d / "manifest.json").read_text())["body"]
    body["files"].pop("rank-00001.safetensors")
    body["tensors"] = {n: t for n, t in body["tensors"].items() if t["file"] != "rank-00001.safetensors"}
    (d / "manifest.json").write_bytes(dump_manifest(body))
    (d / "rank-00001.safetensors").unlink()
    with pytest.raises(autockpt.errors.CorruptCheckpointError, match="do not cover it: a shard is missing"):
        autockpt.load(str(a), step=2)


def test_preemption_signal_on_one_rank_stops_all_at_the_same_step(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    g = Group("preempt", 2, out, ckpt)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "ready-1").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in g.procs), g.logs()
        time.sleep(0.05)
    os.kill(int((out / "ready-1").read_text()), signal.SIGUSR1)
    assert g.wait() == [0, 0], g.logs()
    r0, r1 = g.results()
    assert r1["received"] == signal.SIGUSR1 and r0["received"] is None
    assert r0["stopped_at"] == r1["stopped_at"] >= 5
    assert r0["all_steps"] == r1["all_steps"] == [r0["stopped_at"]]  # one checkpoint, at that step
    assert autockpt.CheckpointManager(str(ckpt)).all_steps() == [r0["stopped_at"]]


def test_resume_loop_under_a_process_group_stops_all_ranks_together_and_resumes(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    g = Group("resume_loop", 2, out, ckpt, "3000")
    deadline = time.monotonic() + TIMEOUT
    while not (out / "ready-1").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in g.procs), g.logs()
        time.sleep(0.05)
    os.kill(int((out / "ready-1").read_text()), signal.SIGUSR1)  # only rank 1 is preempted
    assert g.wait() == [0, 0], g.logs()
    r0, r1 = g.results()
    assert r0["preempted"] and r1["preempted"] and r0["step"] == r1["step"] > 5
    assert r1["exit_code"] == 128 + signal.SIGUSR1 and r0["exit_code"] == 128 + signal.SIGTERM
    assert r0["all_steps"] == r1["all_steps"] == [r0["step"]]  # one checkpoint, at the step where they stopped
    stopped = r0["step"]
    r0, r1 = run("resume_loop", 2, tmp_path / "out2", ckpt, str(stopped + 3))  # the relaunched group resumes
    assert r0["started_at"] == r1["started_at"] == stopped
    assert r0["finished"] and r1["finished"] and r0["step"] == r1["step"] == stopped + 3
    assert r0["weight"] == r1["weight"]  # DDP replicas stay identical after the resume


@pytest.mark.parametrize("failing", [0, 1])
def test_failing_write_on_one_rank_raises_on_all_ranks(tmp_path: Path, failing: int) -> None:
    ckpt = tmp_path / "ckpt"
    res = run("fail_one", 2, tmp_path / "out", ckpt, str(failing))
    for r in res:
        assert r["error"] is not None and r["error"]["type"] == "SaveError", r
        assert f"rank {failing}: OSError" in r["error"]["message"]
        assert r["error"]["failed_ranks"] == [failing]  # the error holds each failed rank, not just a text
        assert r["saved_after"] is True  # the group is still usable: the next save commits
        assert r["all_steps"] == [1, 3]
    assert _listed(ckpt) == ["step_0000000001", "step_0000000003"]  # partial files removed


@pytest.mark.parametrize("killed", [pytest.param(0, marks=pytest.mark.full), 1])
def test_sigkill_of_one_rank_mid_save_commits_nothing_and_the_group_resumes(tmp_path: Path, killed: int) -> None:
    ckpt = tmp_path / "ckpt"
    g = Group("kill_one", 2, tmp_path / "o1", ckpt, str(killed))
    codes = g.wait()
    survivor = 1 - killed
    assert codes[killed] == -signal.SIGKILL and codes[survivor] == 0, (codes, g.logs())
    (res,) = g.results([survivor])
    assert res["error"] is not None and res["error"]["type"] == "SaveError", res
    assert step_files(ckpt).keys() == {"step_0000000001"}  # step 2 was never committed
    resumed = run("resume", 2, tmp_path / "o2", ckpt)
    for r in resumed:
        assert r["all_steps"] == [1] and r["restored"] == 1
    assert resumed[0]["full"] == res["full_1"]
    assert _listed(ckpt) == ["step_0000000001"]  # the restarted group removed the leftovers


def test_sharded_save_and_restore_on_an_object_store(tmp_path: Path, s3_url: tuple[str, dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, opts = s3_url
    monkeypatch.setenv("AUTOCKPT_TEST_STORAGE_OPTIONS", json.dumps(opts))
    res = run("s3", 2, tmp_path / "out", url)
    assert all(r["restored"] == 2 for r in res)
    assert res[0]["full_after"] == res[0]["full"]
    mgr = autockpt.CheckpointManager(url, storage_options=opts)
    assert mgr.all_steps() == [2]
    names = {p.rsplit("/", 1)[-1] for p in mgr.storage.fs.ls(mgr.storage.path("step_0000000002"), detail=False)}
    assert names == {"manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"}
    assert [p for p in mgr.storage.fs.ls(mgr.storage.root, detail=False) if "probe" in p] == []


def test_unshared_local_storage_is_detected_at_start(tmp_path: Path) -> None:
    res = run("unshared", 2, tmp_path / "out", tmp_path / "ckpt")
    for r in res:
        assert r["error"] is not None and r["error"]["type"] == "InvalidArgumentError", r
        assert "not shared between the ranks: ranks [1]" in r["error"]["message"]
    assert not list((tmp_path / "ckpt" / "rank0").iterdir())  # rank 0 removed its probe file


@pytest.mark.full
def test_tiers_on_two_ranks_survive_a_rank_killed_mid_upload(tmp_path: Path, s3_server: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """2 ranks, each with its own local dir, one S3 remote: rank 1 is SIGKILLed at the first payload PUT of step
    3's upload (after steps 1 and 2 became durable). Rank 0 learns of it within rank_timeout (no hang) and the
    remote never commits step 3; both restart, restore step 3 exactly (locally complete on both ranks) and its
    upload finishes; then a rank whose local dir is gone restores it from the remote."""
    from faultproxy import FaultProxy, s3_options

    url = f"s3://{s3_server.new_bucket()}/run"
    local = tmp_path / "local"
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AUTOCKPT_TEST_STORAGE_OPTIONS", json.dumps(s3_options(proxy.endpoint, timeout=5)))
        g = Group("tiers_save", 2, tmp_path / "o1", url, str(local))
        proxy.arm(g.procs[1].pid, 5, kind="payload PUT")  # each step uploads one file per rank: step 3's first
        codes = g.wait(90)
        assert codes[1] == -signal.SIGKILL and codes[0] == 0, (codes, proxy.killed, g.logs())
        (res,) = g.results([0])
        assert res["durable"] == 2 and res["durable_after"] == 2, res  # step 3 never became durable
        for err in (res["error"], res["close_error"]):  # the failure reached rank 0, bounded by rank_timeout
            assert err is not None and err["type"] == "SaveError" and "rank 1" in err["message"], res
        opts = s3_server.storage_options
        remote = autockpt.CheckpointManager(url, storage_options=opts, distributed=False)
        assert remote.all_steps() == [1, 2]  # no partial remote checkpoint of step 3 is committed
        remote.close()
        assert "step_0000000003" in os.listdir(local / "rank1")  # committed locally before the upload

        def expected(rank: int) -> dict[str, Any]:  # the model is replicated; "mine" is 0*10 + rank + 1 + 2 + 3
            return {**res["state_3"], "mine": [float(rank + 6)] * 4}

        assert expected(0) == res["state_3"]
        resumed = run("tiers_resume", 2, tmp_path / "o2", url, str(local))
        for r in resumed:
            assert r["restored"] == 3 and r["finished"] and r["durable"] == 3, r
            assert r["state"] == expected(r["rank"]), r  # exactly what each rank had committed locally
        state = autockpt.load(url, 3, storage_options=opts)  # the remote copy alone verifies
        assert state["model"]["weight"].tolist() == res["state_3"]["weight"]

        shutil.rmtree(local / "rank1")  # a replaced node: its local dir is empty
        again = run("tiers_resume", 2, tmp_path / "o3", url, str(local))
        for r in again:
            assert r["restored"] == 3 and r["state"] == expected(r["rank"]), r


def test_sharded_dedup_each_rank_writes_only_its_changed_shards(tmp_path: Path) -> None:
    """FSDP2 on 2 ranks, a frozen backbone and a trained head saved 3 times (dedup, the default): after the first
    save neither rank writes its backbone shards again; the restore is exact."""
    from autockpt.reader import read_manifest
    from autockpt.storage import open_storage

    ckpt = tmp_path / "ckpt"
    res = run("dedup_shards", 2, tmp_path / "out", ckpt)
    storage = open_storage(str(ckpt))
    for step in (1, 2, 3):
        m = read_manifest(storage, step)
        assert m["files"] == {}, f"step {step}: deduplicated, no payload files of its own"
        backbone = {n: t for n, t in m["tensors"].items() if n.startswith("backbone")}
        shards = [t for t in backbone.values() if "shard_of" in t]
        assert len({tuple(t["shard_offsets"]) for t in shards}) >= 2, "shards of both ranks are in the manifest"
        for name, t in backbone.items():  # written by step 1's save, on whichever rank holds the shard
            assert t["blob"].startswith("step_0000000001-"), f"step {step}: {name} was written again"
        head = [t for n, t in m["tensors"].items() if n.startswith(("head", "opt")) and "shard_of" in t]
        assert head and all(t["blob"].startswith(f"step_{step:010d}-") for t in head), f"step {step}: head shards"
    for r in res:
        assert r["restored"] == 3
        assert r["full_after"] == r["full"] == res[0]["full"]

"""Per-rank state under torch.distributed: every rank's RNGs saved and restored into the same rank (issue 15).

Real gloo process groups of CPU processes, real SIGKILL/SIGTERM. ``tests/scripts/dist_exact.py`` is a 2-rank DDP
run (dropout, ``ResumableLoader(shuffle=True)`` shards, Adam, ``autockpt.resume``); ``tests/scripts/dist_worker.py``
holds the smaller scenarios.
"""

from __future__ import annotations

import json
import os
import random
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

import autockpt  # noqa: E402  (after the skips)

ROOT = Path(__file__).resolve().parents[1]
EXACT = ROOT / "tests" / "scripts" / "dist_exact.py"
WORKER = ROOT / "tests" / "scripts" / "dist_worker.py"
STEPS = 18  # 3 epochs of 6 batches on each rank
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, n: int, port: int) -> dict[str, str]:
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))


def launch(script: Path, n: int, out: Path, *args: str) -> list[subprocess.Popen[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(script), *args], env=_env(r, n, port),
                             stdout=open(out / f"log-{r}.txt", "a"), stderr=subprocess.STDOUT) for r in range(n)]


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("log-*.txt")))


def wait(procs: list[subprocess.Popen[bytes]], out: Path, timeout: float = TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process group did not finish within {timeout} s (a hang):\n{logs(out)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def records(out: Path, rank: int) -> list[dict[str, Any]]:
    path = out / f"steps-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def exact_run(out: Path, ckpt: Path, mode: str = "per_rank", interrupt: tuple[int, int, list[int]] | None = None
              ) -> list[int]:
    """One launch of dist_exact.py on 2 ranks; ``interrupt=(signal, step, ranks)`` sends ``signal`` to ``ranks``
    once rank 0 logged ``step`` steps in this launch."""
    before = len(records(out, 0))
    procs = launch(EXACT, 2, out, str(out), str(ckpt), mode, "0.05" if interrupt else "0")
    if interrupt is not None:
        sig, at, ranks = interrupt
        deadline = time.monotonic() + TIMEOUT
        while len(records(out, 0)) - before < at:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(out)
            time.sleep(0.02)
        for r in ranks:
            procs[r].send_signal(sig)
    return wait(procs, out)


def effective(out: Path, rank: int, seed: int) -> dict[int, dict[str, Any]]:
    """Each step's record; a step trained again after a SIGKILL must repeat the lost one bit for bit."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in records(out, rank):
        step = rec["step"]
        assert by_step.get(step, rec) == rec, f"rank {rank} step {step} differs when trained again (seed {seed})"
        by_step[step] = rec
    return by_step


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted 2-rank run: every rank's per-step records and final parameters."""
    tmp = tmp_path_factory.mktemp("reference")
    assert exact_run(tmp, tmp / "ckpt") == [0, 0], logs(tmp)
    ref = {r: records(tmp, r) for r in (0, 1)}
    assert [rec["step"] for rec in ref[0]] == list(range(STEPS))
    assert ref[0][0]["loss"] != ref[1][0]["loss"]  # the ranks' data and dropout differ
    return {"steps": ref, "final": {r: json.loads((tmp / f"final-{r}.json").read_text()) for r in (0, 1)}}


def test_ddp_sigkill_of_the_group_and_sigterm_to_one_rank_resume_bit_identically(
        tmp_path: Path, reference: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    kill_at, term_at = rng.choice([5, 7, 9]), rng.choice([3, 4, 5])  # mid-epoch: epochs have 6 steps
    ckpt = tmp_path / "ckpt"
    codes = exact_run(tmp_path, ckpt, interrupt=(signal.SIGKILL, kill_at, [0, 1]))
    assert codes == [-signal.SIGKILL] * 2, (seed, codes, logs(tmp_path))
    term_rank = rng.choice([0, 1])
    codes = exact_run(tmp_path, ckpt, interrupt=(signal.SIGTERM, term_at, [term_rank]))
    assert codes == [143, 143], (seed, codes, logs(tmp_path))  # both ranks saved the same step and stopped
    assert "autockpt: SIGTERM: saved step" in (tmp_path / f"log-{term_rank}.txt").read_text()
    assert exact_run(tmp_path, ckpt) == [0, 0], (seed, logs(tmp_path))
    for r in (0, 1):
        got = effective(tmp_path, r, seed)
        assert sorted(got) == list(range(STEPS)), (seed, r)
        for ref in reference["steps"][r]:
            assert got[ref["step"]] == ref, f"rank {r} step {ref['step']}: loss or samples differ (seed {seed})"
        final = json.loads((tmp_path / f"final-{r}.json").read_text())
        assert final == reference["final"][r], f"rank {r}: parameters differ (seed {seed})"


@pytest.mark.full
def test_saving_rank_0_s_rng_only_breaks_the_exact_resume(tmp_path: Path, reference: dict[str, Any]) -> None:
    """The old behaviour (rank 0's RNGs restored into every rank): rank 1's steps after the resume differ."""
    ckpt = tmp_path / "ckpt"
    assert exact_run(tmp_path, ckpt, "rank0", interrupt=(signal.SIGTERM, 4, [1])) == [143, 143], logs(tmp_path)
    assert exact_run(tmp_path, ckpt, "rank0") == [0, 0], logs(tmp_path)
    for r in (0, 1):
        assert sorted(effective(tmp_path, r, 0)) == list(range(STEPS))
    ref1 = reference["steps"][1]
    got1 = effective(tmp_path, 1, 0)
    assert [got1[s]["ids"] for s in range(STEPS)] == [rec["ids"] for rec in ref1]  # the data order is exact
    assert [got1[s]["loss"] for s in range(STEPS)] != [rec["loss"] for rec in ref1]  # rank 1's draws are not
    assert json.loads((tmp_path / "final-1.json").read_text()) != reference["final"][1]


@pytest.mark.parametrize(("before", "after"), [
    pytest.param(2, 4, marks=pytest.mark.full),
    pytest.param(4, 2, marks=pytest.mark.full),
])
def test_another_world_size_derives_the_new_ranks_rngs_and_says_the_resume_is_not_exact(
        tmp_path: Path, before: int, after: int) -> None:
    ckpt = tmp_path / "ckpt"
    assert wait(launch(WORKER, before, tmp_path / "a", "rng_save", str(tmp_path / "a"), str(ckpt)),
                tmp_path / "a") == [0] * before, logs(tmp_path / "a")
    saved = [json.loads((tmp_path / "a" / f"result-{r}.json").read_text()) for r in range(before)]
    assert wait(launch(WORKER, after, tmp_path / "b", "rng_restore", str(tmp_path / "b"), str(ckpt)),
                tmp_path / "b") == [0] * after, logs(tmp_path / "b")
    got = [json.loads((tmp_path / "b" / f"result-{r}.json").read_text()) for r in range(after)]
    for r in range(min(before, after)):  # a rank that saved gets its own generators back
        assert got[r]["draws"] == saved[r]["draws"], r
    draws = [tuple(map(tuple, g["draws"].values())) for g in got]
    assert len(set(draws)) == after  # no two ranks share a random stream
    for g in got:
        assert g["again"] == g["draws"]  # derived deterministically (the same on a second restore)
    log0 = (tmp_path / "b" / "log-0.txt").read_text()
    assert f"was saved by {before} process(es) and is restored on {after}, so this resume cannot be bit-exact" in log0
    assert all("cannot be bit-exact" not in (tmp_path / "b" / f"log-{r}.txt").read_text() for r in range(1, after))


def test_a_rank_that_never_reaches_save_is_named_within_rank_timeout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    codes = wait(launch(WORKER, 2, out, "hang", str(out), str(tmp_path / "ckpt")), out)
    assert codes[0] == 0, logs(out)
    res = json.loads((out / "result-0.json").read_text())
    error = res["error"]
    assert error is not None and error["type"] == "SaveError", res
    assert error["failed_ranks"] == [1] and "rank(s) [1] did not reach save(step=2)" in error["message"], error
    assert error["secs"] < 30, error  # rank_timeout=3, not the process group's 60 s


def test_a_rank_that_stops_stepping_under_autockpt_resume_is_named_within_rank_timeout(tmp_path: Path) -> None:
    """``autockpt.resume`` checks every rank in at each step boundary: rank 1 hangs in its loop body after step
    2's update; rank 0 raises ``SaveError`` naming rank 1 after ``rank_timeout=3`` instead of the process group's
    60 s ``RuntimeError``."""
    out = tmp_path / "out"
    codes = wait(launch(WORKER, 2, out, "resume_hang", str(out), str(tmp_path / "ckpt")), out)
    assert codes[0] == 0, logs(out)
    res = json.loads((out / "result-0.json").read_text())
    error = res["error"]
    assert error is not None and error["type"] == "SaveError", res
    assert error["failed_ranks"] == [1] and "rank(s) [1] did not reach the end of step 2" in error["message"], error
    assert res["trained"] == 2 and error["secs"] < 30, (res, error)


def torchrun_2_nodes(tmp: Path, out: Path, url: str, opts: dict[str, Any], delay: str) -> list[subprocess.Popen[bytes]]:
    """``torchrun --nnodes 2`` on 127.0.0.1: two node agents (one process each), each in its own working
    directory with its own node-local checkpoint directory (``local_dir``: tmp/node<n>/local) in front of one
    remote (``url``, an S3 server)."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for node in (0, 1):
        local = tmp / f"node{node}"
        local.mkdir(exist_ok=True)
        env = {k: v for k, v in _env(0, 2, port).items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                       "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                                       "MASTER_PORT")}
        env.update(AUTOCKPT_TEST_LOCAL_DIR=str(local / "local"), AUTOCKPT_TEST_STORAGE_OPTIONS=json.dumps(opts))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(EXACT), str(out), url, "per_rank", delay],
            cwd=local, env=env, stdout=open(out / f"log-node{node}.txt", "a"), stderr=subprocess.STDOUT))
    return procs


@pytest.mark.parametrize("preempted", [
    False,
    pytest.param(True, marks=pytest.mark.full),
])
def test_torchrun_two_nodes_with_node_local_dirs_and_an_s3_remote(
        tmp_path: Path, reference: dict[str, Any], s3_server: Any, preempted: bool) -> None:
    """The multi-node path: each node's rank saves into its own node-local directory, the remote is S3. The
    short variant runs through once; the long one sends SIGTERM to the worker of node 1 mid-epoch (step 8), then
    runs the same torchrun again, which resumes. Every rank's steps and parameters equal the 1-node run's."""
    out, url, opts = tmp_path / "out", f"s3://{s3_server.new_bucket()}/run", s3_server.storage_options
    if preempted:
        procs = torchrun_2_nodes(tmp_path, out, url, opts, "0.05")
        deadline = time.monotonic() + 2 * TIMEOUT
        while len(records(out, 0)) < 8 or not (out / "pid-1").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(out)
            time.sleep(0.02)
        os.kill(int((out / "pid-1").read_text()), signal.SIGTERM)
        codes = wait(procs, out, 2 * TIMEOUT)
        assert all(c != 0 for c in codes), (codes, logs(out))  # the agents report the workers' exit code 143
        assert "autockpt: SIGTERM: saved step" in logs(out)
        assert len(records(out, 0)) < STEPS
    assert wait(torchrun_2_nodes(tmp_path, out, url, opts, "0"), out, 2 * TIMEOUT) == [0, 0], logs(out)
    for r in (0, 1):
        got = effective(out, r, 0)
        assert [got[s] for s in range(STEPS)] == reference["steps"][r], r
        assert json.loads((out / f"final-{r}.json").read_text()) == reference["final"][r], r
    for node in (0, 1):  # each node wrote its own rank's checkpoints into its own local directory
        assert f"step_{STEPS:010d}" in os.listdir(tmp_path / f"node{node}" / "local"), node
    remote = autockpt.CheckpointManager(url, storage_options=opts, distributed=False)
    try:
        assert remote.latest_step == STEPS  # the last step reached the remote
        names = {p.rsplit("/", 1)[-1] for p in remote.storage.fs.ls(remote.storage.path(f"step_{STEPS:010d}"),
                                                                     detail=False)}
        assert {"manifest.json", "rank-00001.safetensors"} <= names, names  # node 1's rank uploaded its own
    finally:
        remote.close()

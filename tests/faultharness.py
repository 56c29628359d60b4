"""Fault trials shared by ``tests/test_faults.py`` and ``benchmarks/reliability.py``.

Each function runs real processes against real storage and returns a ``Counter`` of figures: trials, faults
injected by kind, checkpoints lost, corrupt loads, saves reported that are not there. The tests assert the
bad figures are zero; the benchmark prints them.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import autockpt
from autockpt.errors import AutockptError
from autockpt.reader import open_checkpoint
from autockpt.storage import open_storage as Storage

HERE = Path(__file__).parent
KILL_WRITER = HERE / "scripts" / "kill_writer.py"
FAULT_WRITER = HERE / "scripts" / "fault_writer.py"
ENV = {**os.environ, "PYTHONPATH": str(Path(autockpt.__file__).parents[1]),
       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FLOATS = 20_000


def committed_lines(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed ")]


def check_run(url: str, opts: dict[str, Any] | None, history: list[int], keep: int = 2) -> Counter[str]:
    """After a crash: what a new process finds. Counts lost checkpoints, corrupt loads and phantom steps."""
    figures: Counter[str] = Counter({"corrupt loads": 0, "checkpoints lost": 0})
    storage = Storage(url, opts)
    on_disk = sorted(storage.scan().committed)
    figures["phantom checkpoints (committed, never reported, not the one in flight)"] += len(
        set(on_disk) - set(history))
    expected = sorted(history)[-keep:]
    figures["checkpoints lost"] += len(set(expected) - set(on_disk))
    for step in on_disk:
        try:
            with open_checkpoint(storage, step) as ckpt:
                state = ckpt.state()
            if state["meta"]["step"] != step or not (state["w"] == step).all():
                figures["corrupt loads"] += 1
        except AutockptError:
            figures["corrupt loads"] += 1
    mgr = autockpt.CheckpointManager(url, storage_options=opts)  # a new process would do exactly this
    if history:
        target = {"w": np.zeros(FLOATS, np.float32), "idx": np.zeros(10, np.int64), "meta": None}
        try:
            got = mgr.restore(target)
        except AutockptError:
            got = None
        if got != max(history) or not (target["w"] == max(history)).all() or target["meta"] != {"step": got}:
            figures["corrupt loads"] += 1
    leftovers = Storage(url, opts).scan()
    figures["leftovers after restart"] += len(leftovers.temporary) + len(leftovers.uncommitted)
    return figures


def _in_flight(url: str, opts: dict[str, Any] | None, history: list[int], start: int | None) -> None:
    """A step whose save was killed counts as committed once its commit landed (the rename / manifest PUT)."""
    nxt = (max(history) if history else (start or 1) - 1) + 1
    if nxt in Storage(url, opts).scan().committed and nxt not in history:
        history.append(nxt)


def local_phase(line: str) -> str:
    """Which part of a save a filesystem operation of kill_writer.py is, from its 'EVENT PATH' text."""
    event, _, path = line.partition(" ")
    base = os.path.basename(path)
    if "lease" in base:
        return "lease"
    if event == "open" and base.endswith(".safetensors") or event == "os.mkdir" and ".tmp-step" in base:
        return "payload write"
    if event == "open" and base == "manifest.json":
        return "manifest write"
    if event == "os.fsync" or (event == "os.rename" and base.startswith(".tmp-step")):
        return "commit (fsync, rename)"
    if event in ("os.remove", "os.rmdir", "os.rename"):
        return "pruning (rename away, unlink, rmdir)"
    return "listing and reading"


def local_kill_points(root: Path) -> dict[str, list[int]]:
    """The filesystem operations of three saves by kill_writer.py, by phase: {phase: [operation numbers]}."""
    url = str(root / f"trace-{uuid.uuid4().hex[:8]}")
    for _ in range(2):  # the second run is the steady state: it prunes what the first one saved
        proc = subprocess.run([sys.executable, str(KILL_WRITER), url, "3", "0", str(FLOATS)], capture_output=True,
                              text=True, timeout=120, env={**ENV, "AUTOCKPT_TRACE": "1"})
        assert proc.returncode == 0, proc.stderr
    points: dict[str, list[int]] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("event "):
            _, n, rest = line.split(" ", 2)
            points.setdefault(local_phase(rest), []).append(int(n))
    return points


def crash_trials_local(root: Path, trials: int, seed: int = 0) -> Counter[str]:
    """SIGKILL a local writer at a filesystem operation of each phase in turn, and (every 4th) at random."""
    figures: Counter[str] = Counter()
    rng = random.Random(seed)
    points = local_kill_points(root)
    phases = sorted(points)
    url = str(root / f"local-{uuid.uuid4().hex[:8]}")
    history: list[int] = []
    i = 0
    while figures["trials"] < trials:
        i += 1
        timed = i % 4 == 0
        phase = phases[i % len(phases)]
        kill_at = rng.choice(points[phase])
        args = [sys.executable, str(KILL_WRITER), url, "3", "0" if timed else str(kill_at), str(FLOATS)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        if timed:
            time.sleep(rng.uniform(0.4, 1.6))
            proc.kill()
        out, err = proc.communicate(timeout=120)
        history += committed_lines(out)
        if proc.returncode != -9:
            if proc.returncode != 0:
                raise RuntimeError(err)
            continue  # the random moment came after the saves finished
        _in_flight(url, None, history, None)
        figures["trials"] += 1
        killed = [line for line in err.splitlines() if line.startswith("killed-at ")]
        landed = local_phase(killed[0].split(" ", 1)[1]) if killed else "a random moment"
        figures[f"SIGKILL during: {landed}"] += 1
        figures.update(check_run(url, None, history))
    figures["checkpoints committed"] = len(set(history))
    return figures


def crash_trials_s3(endpoint: str, new_bucket: Callable[[], str], trials: int, seed: int = 0) -> Counter[str]:
    """SIGKILL an S3 writer at its N-th HTTP request (counted by the proxy), before or after it lands."""
    from faultproxy import FaultProxy, s3_options

    figures: Counter[str] = Counter()
    rng = random.Random(seed)
    direct = s3_options(endpoint, timeout=10)
    url = f"s3://{new_bucket()}/run"
    history: list[int] = []
    with FaultProxy(endpoint) as proxy:
        for _ in range(2):  # the second run is the steady state (it prunes): its requests, by kind
            n0 = len(proxy.trace)
            out = subprocess.run([sys.executable, str(FAULT_WRITER), url, proxy.endpoint, "3", str(FLOATS)],
                                 capture_output=True, text=True, timeout=120, env=ENV)
            assert out.returncode == 0, out.stderr
            history += committed_lines(out.stdout)
        per_kind = Counter(proxy.trace[n0:])  # kill at the k-th request of one kind, each kind in turn
        kinds = sorted(per_kind)
        i = 0
        while figures["trials"] < trials:
            i += 1
            proc = subprocess.Popen([sys.executable, str(FAULT_WRITER), url, proxy.endpoint, "3", str(FLOATS)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            kind = kinds[i % len(kinds)]
            proxy.arm(proc.pid, rng.randint(1, per_kind[kind]), after_forward=i % 3 == 0, kind=kind)
            out_s, err = proc.communicate(timeout=120)
            proxy.disarm()
            history += committed_lines(out_s)
            if proc.returncode != -9:
                if proc.returncode != 0:
                    raise RuntimeError(err)
                continue
            start = next((int(line.split()[1]) for line in out_s.splitlines() if line.startswith("start ")), None)
            _in_flight(url, direct, history, start)
            figures["trials"] += 1
            figures[f"SIGKILL at HTTP request: {proxy.killed}"] += 1
            figures.update(check_run(url, direct, history))
    figures["checkpoints committed"] = len(set(history))
    return figures


def flaky_saves(endpoint: str, new_bucket: Callable[[], str], saves: int, rate: float = 0.10, seed: int = 0,
                ) -> Counter[str]:
    """``saves`` saves through a proxy failing ``rate`` of requests: nothing lost, nothing reported falsely."""
    from faultproxy import FaultProxy, s3_options

    figures: Counter[str] = Counter()
    url = f"s3://{new_bucket()}/run"
    direct = s3_options(endpoint, timeout=10)
    logging.getLogger("autockpt").setLevel(logging.ERROR)
    reported: list[int] = []
    with FaultProxy(endpoint, fail_rate=rate, seed=seed, delay_s=2.5, max_seconds=1200) as proxy:
        mgr = autockpt.CheckpointManager(url, max_to_keep=None, storage_options=s3_options(proxy.endpoint, 1.0),
                                         max_consecutive_failures=10**6)
        for step in range(1, saves + 1):
            state = {"w": np.full(FLOATS, step, np.float32), "idx": np.arange(step, step + 10), "meta": {"step": step}}
            try:
                ok = mgr.save(step, state)
            except AutockptError:
                ok = False
            figures["saves attempted"] += 1
            if ok:
                reported.append(step)
                figures["saves reported"] += 1
            else:
                figures["saves reported failed"] += 1
        mgr.close()
        figures.update({k: v for k, v in proxy.stats.items() if k.startswith(("fault", "requests"))})
    storage = Storage(url, direct)
    on_disk = set(storage.scan().committed)
    figures["reported saved but missing (checkpoints lost)"] = len(set(reported) - on_disk)
    figures["reported failed but committed"] = len(on_disk - set(reported))
    for step in sorted(on_disk):
        try:
            with open_checkpoint(storage, step) as ckpt:
                if ckpt.state()["meta"]["step"] != step:
                    figures["corrupt loads"] += 1
        except AutockptError:
            figures["corrupt loads"] += 1
    figures["corrupt loads"] += 0
    return figures


TIER_WRITER = HERE / "scripts" / "tier_kill_writer.py"
TIER_FLOATS = 2_700_000  # 10.8 MB: a multipart upload in two parts (8 MiB, then the rest) and the requests around


def _tier_check(url: str, opts: dict[str, Any], local: Path, history: list[int]) -> Counter[str]:
    """After a kill during uploads: every committed remote checkpoint verifies (no partial one is ever
    restored), what the remote policy keeps (the 2 newest) is on one tier at least, the newest restores."""
    figures: Counter[str] = Counter({"corrupt loads": 0, "checkpoints lost": 0})
    remote = Storage(url, {**opts, "skip_instance_cache": True})
    on_remote = set(remote.scan().committed)
    here = set(Storage(str(local)).scan().committed)
    for step in sorted(on_remote):
        try:
            with open_checkpoint(remote, step) as ckpt:
                if ckpt.state()["meta"]["step"] != step:
                    figures["corrupt loads"] += 1
        except AutockptError:
            figures["corrupt loads"] += 1
    figures["checkpoints lost"] += len(set(sorted(history)[-2:]) - on_remote - here)
    figures["phantom checkpoints (committed, never reported, not the one in flight)"] += len(
        (on_remote | here) - set(history))
    if history:
        try:
            state = autockpt.load(url, storage_options=opts, local_dir=local)  # verified, local copy first
            if state["meta"]["step"] != max(history) or not (state["w"] == max(history)).all():
                figures["corrupt loads"] += 1
        except AutockptError:
            figures["corrupt loads"] += 1
    return figures


def crash_trials_tiers(endpoint: str, new_bucket: Callable[[], str], root: Path, rounds: int = 1,
                       phases: int | None = None, seed: int = 0, only: str | None = None) -> Counter[str]:
    """SIGKILL a tiered writer (local_dir + S3) at every phase of its uploads: each request of the multipart
    payload uploads, the manifest PUT, the remote retention DELETEs (the proxy's N-th request of that kind,
    before or after it reaches the server), and its local pruning after an upload (before the local copy is
    touched, and in the middle of its delete). ``phases``: that many of them (seeded), for CI; else all,
    ``rounds`` times; ``only``: the kind of request (``"payload PUT"``, ...) or ``"local"``. The next start
    must restore the newest checkpoint, and the last one finish the backlog."""
    from faultproxy import FaultProxy

    figures: Counter[str] = Counter({"restarts that did not restore the newest checkpoint": 0})
    rng = random.Random(seed)
    url = f"s3://{new_bucket()}/run"
    local = root / f"tiers-{uuid.uuid4().hex[:8]}"
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    history: list[int] = []

    def run(proxy: FaultProxy, saves: int, kill_local: int = 0, arm: tuple[str, int, bool] | None = None
            ) -> tuple[int, str, str]:
        newest = max(history, default=None)
        proc = subprocess.Popen([sys.executable, str(TIER_WRITER), url, str(local), proxy.endpoint, str(saves),
                                 str(kill_local), str(TIER_FLOATS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV)
        if arm is not None:
            proxy.arm(proc.pid, arm[1], after_forward=arm[2], kind=arm[0])
        out, err = proc.communicate(timeout=300)
        proxy.disarm()
        history.extend(committed_lines(out))
        start = [line.split()[1] for line in out.splitlines() if line.startswith("start ")]
        if start and start[0] != str(newest):  # the script checked that what it restored has that step's values
            figures["restarts that did not restore the newest checkpoint"] += 1
        here = Storage(str(local)).scan().committed  # a save whose local commit landed before the kill
        if here and max(here) not in history:
            history.append(max(here))
        return proc.returncode, out, err

    with FaultProxy(endpoint) as proxy:
        # the second run is the steady state (it prunes on both tiers): its requests, by kind; CI skips it and
        # arms only the requests every save makes (multipart start, 2 parts, complete; the manifest PUT)
        for saves in (2, 1) if phases is None else (2,):
            n0 = len(proxy.trace)
            rc, _, err = run(proxy, saves)
            assert rc == 0, err
        per_kind = Counter(proxy.trace[n0:]) if phases is None else Counter({"payload PUT": 4, "manifest PUT": 1})
        points: list[tuple[str, int, bool] | int] = [
            (kind, k, after) for kind in ("payload PUT", "manifest PUT", "DELETE")
            for k in range(1, per_kind[kind] + 1) for after in (False, True)]
        points += [1, 2, 3, 4]  # local pruning: before the rename away, after it, between the unlinks, at rmdir
        if only is not None:
            points = [p for p in points if (p[0] == only if isinstance(p, tuple) else only == "local")]
        # CI: points in a seeded order until `phases` kills landed (a point the run does not reach, e.g. a 4th
        # local pruning operation where a deduplicated step directory holds only its manifest, draws the next)
        todo = rng.sample(points, len(points)) if phases is not None else points * rounds
        for point in todo:
            if phases is not None and figures["trials"] >= phases:
                break
            if isinstance(point, int):
                rc, _, err = run(proxy, 1, kill_local=point)
                killed = [line for line in err.splitlines() if line.startswith("killed-at ")]
                label = f"local pruning op {point}: {killed[0].split()[1] if killed else ''}"
            else:
                rc, _, err = run(proxy, 1, arm=point)
                label = f"HTTP request: {proxy.killed}"
            if rc != -9:
                if rc != 0:
                    raise RuntimeError(err)
                figures["armed, not reached (the run ended first)"] += 1
                continue
            figures["trials"] += 1
            figures[f"SIGKILL at {label}"] += 1
            figures.update(_tier_check(url, opts, local, history))
        rc, out, err = run(proxy, 0)  # the next start: restores the newest, finishes the backlog
        assert rc == 0, err
    figures.update(_tier_check(url, opts, local, history))
    on_remote = set(Storage(url, {**opts, "skip_instance_cache": True}).scan().committed)
    figures["kept checkpoints not uploaded in the end"] += len(set(sorted(history)[-2:]) - on_remote)
    figures["checkpoints committed"] = len(set(history))
    return figures

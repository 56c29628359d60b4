"""AutoCheckpoint for PyTorch Lightning: real training in subprocesses, killed with real signals, resumed exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from safetensors.torch import load_file  # noqa: E402

import autockpt  # noqa: E402
from autockpt.errors import InvalidArgumentError, UnsupportedValueError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "lightning_train.py"
STEPS = 48  # 3 epochs of 16 batches


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(tmp: Path, package: str, kill: tuple[int, int] | None = None, strategy: str = "auto",
         timeout: float = 240) -> tuple[int, int | None]:
    """One run of the identical fit; with ``kill=(signal, step)``, send the signal once the child printed
    that step. Returns (exit code, last step printed)."""
    args = [sys.executable, str(SCRIPT), str(tmp / "ckpt"), str(tmp / "log"), str(tmp / "weights.safetensors"),
            package, strategy, "0.01" if kill else "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
                            start_new_session=True)
    last = None
    sent = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("STEP "):
                last = int(line.split()[1])
                if kill is not None and not sent and last >= kill[1]:
                    if kill[0] == signal.SIGKILL:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, kill[0])
                    sent = True
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, last


def _segments(log: Path) -> list[list[tuple[int, str]]]:
    """The log split into runs: each a list of (global_step, sample indices)."""
    runs: list[list[tuple[int, str]]] = []
    for line in log.read_text().splitlines():
        if line.startswith("START"):
            runs.append([])
        elif line.startswith("STEP "):
            _, step, idx = line.split()
            runs[-1].append((int(step), idx))
    return runs


def _ends(log: Path) -> list[dict[str, str]]:
    return [dict(kv.split("=") for kv in line.split()[1:]) for line in log.read_text().splitlines()
            if line.startswith("END")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run: its weights and its (step, samples) sequence."""
    tmp = tmp_path_factory.mktemp("reference")
    rc, last = _run(tmp, "lightning")
    assert rc == 0 and last == STEPS - 1
    (run,) = _segments(tmp / "log")
    assert [s for s, _ in run] == list(range(STEPS))
    return {"weights": load_file(str(tmp / "weights.safetensors")), "steps": run}


def _check_resumed(tmp: Path, reference: dict[str, Any], sigterm_runs: set[int]) -> None:
    weights = load_file(str(tmp / "weights.safetensors"))
    assert weights.keys() == reference["weights"].keys()
    for k, v in reference["weights"].items():
        assert torch.equal(weights[k], v), k
    runs = _segments(tmp / "log")
    ends = _ends(tmp / "log")
    effective: dict[int, str] = {}
    for i, run in enumerate(runs):
        steps = [s for s, _ in run]
        start = steps[0] if steps else None
        # within a run: consecutive global steps, no gap, no repeat
        assert steps == list(range(start, start + len(steps))) if steps else True
        if i > 0:
            prev = [s for s, _ in runs[i - 1]]
            if i - 1 in sigterm_runs:  # preempted: saved the step it reached; continues right after it
                assert start == prev[-1] + 1, (i, start, prev[-1])
            else:  # SIGKILL: continues right after the newest checkpoint, which is at most where it died
                assert start is not None and start <= prev[-1] + 1
        for s, idx in run:
            effective[s] = idx  # a step redone after SIGKILL replaces the lost one
    # every step trained with exactly the samples of the uninterrupted run, in the same order
    assert [(s, effective[s]) for s in sorted(effective)] == reference["steps"]
    assert ends[-1]["preempted"] == "0" and int(ends[-1]["step"]) == STEPS


@pytest.mark.timeout(600)
@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_killed_and_resumed_matches_uninterrupted(tmp_path: Path, reference: dict[str, Any], package: str) -> None:
    if package == "pytorch_lightning":
        pytest.importorskip("pytorch_lightning")
    rng = random.Random(os.getpid())
    # a SIGKILL and a SIGTERM mid-epoch each (epochs have 16 batches), then one of either at a random step
    kills = [(signal.SIGKILL, rng.choice([3, 7, 9, 12])),
             (signal.SIGTERM, rng.choice([18, 21, 26, 29])),
             (rng.choice([signal.SIGKILL, signal.SIGTERM]), rng.randrange(33, 46))]
    sigterm_runs = set()
    for i, (sig, at) in enumerate(kills):
        rc, last = _run(tmp_path, package, kill=(sig, at))
        assert last is not None and last >= at
        if sig == signal.SIGTERM:
            sigterm_runs.add(i)
            assert rc == 0  # saved and stopped cleanly
            assert _ends(tmp_path / "log")[-1]["preempted"] == "1"
            assert int(_ends(tmp_path / "log")[-1]["step"]) == last + 1
        else:
            assert rc == -signal.SIGKILL
    rc, last = _run(tmp_path, package)
    assert rc == 0
    _check_resumed(tmp_path, reference, sigterm_runs)
    # the identical call once more: the run is complete, nothing is trained again
    before = len(_segments(tmp_path / "log"))
    assert _run(tmp_path, package) == (0, None)
    assert len(_segments(tmp_path / "log")) == before + 1 and _segments(tmp_path / "log")[-1] == []

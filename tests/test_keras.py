"""AutoCheckpoint for Keras 3 (torch backend): exact resume after SIGKILL/SIGTERM, in real subprocesses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import autockpt  # noqa: E402
from autockpt.errors import InvalidArgumentError, StateMismatchError  # noqa: E402
from autockpt.integrations import _keras_internals as internals  # noqa: E402
from autockpt.integrations.keras import AutoCheckpoint, VariablesState, keras_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "keras_train.py"
sys.path.insert(0, str(SCRIPT.parent))
import keras_train  # noqa: E402

TOTAL = keras_train.EPOCHS * (keras_train.N // keras_train.BATCH)


def _env() -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    return env


def _run(ckpt: Path, out: Path, kind: str, sig: int | None = None, at: int = 0) -> tuple[str, list[str]]:
    """Run the child; send ``sig`` once it reports global batch >= ``at``. Returns (how it ended, lines)."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(ckpt), str(out), kind, "0.03" if sig else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    lines: list[str] = []
    sent = False
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.strip())
        if sig and not sent and line.startswith("BATCH") and int(line.split()[1]) >= at:
            os.kill(proc.pid, sig)
            sent = True
    err = proc.stderr.read() if proc.stderr else ""
    rc = proc.wait(timeout=120)
    if sig == signal.SIGKILL and sent:
        assert rc == -signal.SIGKILL, (rc, err[-2000:])
        return "killed", lines
    assert rc == 0, err[-3000:]
    return lines[-1], lines


def _weights(prefix: Path) -> list[np.ndarray]:
    with np.load(str(prefix) + ".npz", allow_pickle=False) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _interrupted_matches_uninterrupted(tmp_path: Path, kind: str, plan: list[int]) -> list[tuple[int, int]]:
    base_end, _ = _run(tmp_path / "base_ckpt", tmp_path / "base", kind)
    assert base_end == "DONE"
    base_w = _weights(tmp_path / "base")
    base_h = json.loads((tmp_path / "base.json").read_text())
    assert base_h["epoch"] == list(range(keras_train.EPOCHS))

    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    ckpt, out = tmp_path / "ckpt", tmp_path / "run"
    resumes: list[tuple[int, int]] = []
    reached = 0
    for sig in plan:  # each at a random batch, mid-epoch or not
        at = rng.randrange(reached + 2, reached + 14)
        end, lines = _run(ckpt, out, kind, sig, at)
        resumes += [(int(ln.split()[1]), int(ln.split()[2])) for ln in lines if ln.startswith("RESUMED")]
        batches = [int(ln.split()[1]) for ln in lines if ln.startswith("BATCH")]
        assert batches, lines
        reached = max(batches)
        assert end in ("killed", "PREEMPTED"), (sig, end, lines[-5:], f"seed {seed}")
    for _ in range(5):
        end, lines = _run(ckpt, out, kind)
        resumes += [(int(ln.split()[1]), int(ln.split()[2])) for ln in lines if ln.startswith("RESUMED")]
        if end == "DONE":
            break
    assert end == "DONE"
    final_h = json.loads((out.with_suffix(".json")).read_text())
    first = resumes[-1][0] if resumes[-1][1] == 0 else resumes[-1][0]
    # The last run's History continues from the epoch it resumed in, with the same values.
    assert final_h["epoch"] == list(range(first, keras_train.EPOCHS)), (final_h["epoch"], resumes)
    for k, v in final_h["history"].items():
        assert v == base_h["history"][k][first:], (k, v, base_h["history"][k], f"seed {seed}")
    assert final_h["best"] == base_h["best"]
    assert final_h["iterations"] == base_h["iterations"] == TOTAL
    w = _weights(out)
    assert len(w) == len(base_w)
    for a, b in zip(w, base_w, strict=True):
        assert np.array_equal(a, b), f"weights differ after resuming (seed {seed}, resumes {resumes})"
    return resumes


def test_numpy_fit_resumes_exactly_after_sigkill_and_sigterm(tmp_path: Path) -> None:
    plan = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]
    resumes = _interrupted_matches_uninterrupted(tmp_path, "numpy", plan)
    assert len(resumes) >= len(plan)
    assert any(b > 0 for _, b in resumes), f"no mid-epoch resume happened: {resumes}"


def test_pydataset_fit_resumes_exactly(tmp_path: Path) -> None:
    resumes = _interrupted_matches_uninterrupted(tmp_path, "pydataset", [signal.SIGTERM, signal.SIGKILL])
    assert len(resumes) >= 2

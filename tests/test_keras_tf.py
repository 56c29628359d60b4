"""AutoCheckpoint for Keras 3 on its default TensorFlow backend, in real subprocesses (KERAS_BACKEND=tensorflow).

This process keeps the torch backend; every TensorFlow run is a child. Runs by default: the kill/resume tests
(NumPy input, a seeded tf.data pipeline), the warning for an unseeded shuffle, and the preemption windows.
The PyDataset variant runs with AUTOCKPT_FULL=1.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import test_keras as tk

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="tensorflow-cpu is not installed (scripts/setup.sh installs it)")
FULL = os.environ.get("AUTOCKPT_FULL") == "1"
TF = "tensorflow"


def test_tf_numpy_fit_resumes_exactly_after_sigkill_and_sigterm(tmp_path: Path, seed: int) -> None:
    plan = [signal.SIGKILL, signal.SIGTERM, signal.SIGTERM]
    resumes = tk._interrupted_matches_uninterrupted(tmp_path, "numpy", plan, seed, backend=TF)
    assert len(resumes) >= len(plan), f"seed {seed}"
    assert any(b > 0 for _, b in resumes), f"no mid-epoch resume happened: {resumes} (seed {seed})"


def test_tf_data_pipeline_resumes_exactly_after_sigkill_and_sigterm(tmp_path: Path, seed: int) -> None:
    """from_tensor_slices(...).shuffle(N, seed=11).map(...).batch(16): each epoch reshuffles; a resume at
    epoch e replays the dataset's e earlier iterators, then draws the epoch's first batches again."""
    plan = [signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]
    resumes = tk._interrupted_matches_uninterrupted(tmp_path, "tfdata", plan, seed, backend=TF)
    assert len(resumes) >= len(plan), f"seed {seed}"
    assert any(e > 0 for e, _ in resumes), f"no resume after epoch 0: {resumes} (seed {seed})"


def test_tf_data_unseeded_shuffle_warns_on_mid_epoch_resume(tmp_path: Path) -> None:
    ck, out, err = tmp_path / "ck", tmp_path / "run", []  # type: ignore[var-annotated]
    end, _ = tk._run(ck, out, "tfdata_unseeded", signal.SIGTERM, 5, backend=TF, stderr=err)
    assert end == "preempted"
    end, lines = tk._run(ck, out, "tfdata_unseeded", backend=TF, stderr=err)
    assert end == "DONE", lines[-5:]
    warned = [ln for ln in err[1].splitlines() if "may not see the same data" in ln]
    assert len(warned) == 1, err[1][-3000:]
    assert "shuffle without a seed" in warned[0] and "shuffle(buffer_size, seed=...)" in warned[0], warned
    assert "may not see the same data" not in err[0]  # the first run started fresh: nothing to warn about


def test_tf_numpy_without_global_seed_warns_and_seeded_does_not() -> None:
    """NumPy inputs on TensorFlow are shuffled by tf.random.shuffle: exact only with TensorFlow's global seed."""
    code = (
        "import keras, numpy as np\n"
        "from autockpt.integrations import _keras_internals as internals\n"
        "from keras.src.backend.tensorflow.trainer import TFEpochIterator\n"
        "import tensorflow as tf\n"
        "x = np.zeros((32, 2), 'float32')\n"
        "def caveat():\n"
        "    it = TFEpochIterator(x=x, y=x, batch_size=8, shuffle=True, distribute_strategy=tf.distribute.get_strategy())\n"
        "    return internals.mid_epoch_caveat(it)\n"
        "print('UNSEEDED', caveat())\n"
        "keras.utils.set_random_seed(1)\n"
        "print('SEEDED', caveat())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=tk._env(TF), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in res.stdout.splitlines() if ln.startswith(("UNSEEDED", "SEEDED")))
    assert "keras.utils.set_random_seed" in lines["UNSEEDED"], lines
    assert lines["SEEDED"] == "None", lines


@pytest.mark.skipif(not FULL, reason="long variant: AUTOCKPT_FULL=1")
def test_tf_pydataset_fit_resumes_exactly(tmp_path: Path, seed: int) -> None:
    resumes = tk._interrupted_matches_uninterrupted(tmp_path, "pydataset", [signal.SIGTERM, signal.SIGKILL], seed,
                                                    backend=TF)
    assert len(resumes) >= 2, f"seed {seed}"


@pytest.fixture(scope="module")
def tf_windows() -> Iterator[Any]:
    """keras_windows.py --serve on the TensorFlow backend (each window forked after Keras was imported)."""
    proc = subprocess.Popen([sys.executable, str(tk.WINDOWS), "--serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=tk._env(TF))
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def tf_window_baseline(tf_windows: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tf_windows") / "base"
    rc, stdout, stops = tk._window(tf_windows, out.parent / "ck", out, "none")
    assert rc == 0 and "AFTER FIT" in stdout and stops == [], (rc, stdout[-2000:])
    return out


def test_tf_signal_in_validation_restore_and_callback_epoch_end(tmp_path: Path, tf_windows: Any,
                                                                tf_window_baseline: Path) -> None:
    tk.test_signal_in_validation_restore_and_callback_epoch_end(tmp_path, tf_windows, tf_window_baseline)


def test_tf_signal_while_async_save_in_flight_and_at_the_end(tmp_path: Path, tf_windows: Any,
                                                              tf_window_baseline: Path) -> None:
    tk.test_signal_while_async_save_in_flight_and_at_the_end(tmp_path, tf_windows, tf_window_baseline)

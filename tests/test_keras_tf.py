"""AutoCheckpoint for Keras 3 on its default TensorFlow backend, in real subprocesses (KERAS_BACKEND=tensorflow).

This process keeps the torch backend; every TensorFlow run is a child. By default: the kill/resume tests
(NumPy input, a seeded tf.data pipeline) with two signals, the unseeded-shuffle caveats, and the preemption
windows. AUTOCKPT_FULL=1 adds four-signal plans, a resume in epoch 2, the warning seen in a real resume, and the whole
tests/test_keras.py on TensorFlow.
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

import numpy as np
import pytest
import test_keras as tk

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="tensorflow-cpu is not installed (scripts/setup.sh installs it)")
FULL = os.environ.get("AUTOCKPT_FULL") == "1"
TF = "tensorflow"


# Each TensorFlow child takes ~10-20 s here (import, tracing), so CI sends two signals; AUTOCKPT_FULL=1 four.
PLAN = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM] if FULL else [signal.SIGKILL, signal.SIGTERM]


@pytest.mark.full
def test_tf_numpy_fit_resumes_exactly_after_sigkill_and_sigterm(tmp_path: Path, seed: int) -> None:
    resumes = tk._interrupted_matches_uninterrupted(tmp_path, "numpy", PLAN, seed, backend=TF)
    assert len(resumes) >= len(PLAN) - 1, f"{resumes} (seed {seed})"  # a kill before step 3 leaves nothing
    assert any(b > 0 for _, b in resumes), f"no mid-epoch resume happened: {resumes} (seed {seed})"


def test_tf_data_pipeline_resumes_exactly_after_sigkill_and_sigterm(tmp_path: Path, seed: int) -> None:
    """from_tensor_slices(...).shuffle(N, seed=11).map(...).batch(16), reshuffled every epoch: a resume replays
    the iterators the dataset had made before the epoch, then draws the epoch's first batches again."""
    resumes = tk._interrupted_matches_uninterrupted(tmp_path, "tfdata", PLAN, seed, backend=TF)
    assert len(resumes) >= len(PLAN) - 1, f"{resumes} (seed {seed})"


@pytest.mark.skipif(not FULL, reason="long variant: AUTOCKPT_FULL=1")
def test_tf_data_pipeline_resumes_exactly_in_a_later_epoch(tmp_path: Path) -> None:
    """Stopped in epoch 2 (after two reshuffles): the resumed epoch has the uninterrupted run's order."""
    tk._run(tmp_path / "base_ck", tmp_path / "base", "tfdata", backend=TF)
    end, _ = tk._run(tmp_path / "ck", tmp_path / "run", "tfdata", signal.SIGTERM, 45, backend=TF)
    assert end == "preempted"
    end, lines = tk._run(tmp_path / "ck", tmp_path / "run", "tfdata", backend=TF)
    assert end == "DONE" and any(ln.startswith("RESUMED 2 ") for ln in lines), lines[-5:]
    got, want = tk._weights(tmp_path / "run"), tk._weights(tmp_path / "base")
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), "weights differ after resuming"


def test_tf_unseeded_shuffles_are_named_and_seeded_ones_are_exact() -> None:
    """NumPy inputs on TensorFlow are shuffled by tf.random.shuffle (exact only with TensorFlow's global
    seed); a tf.data shuffle needs its own seed or the global one."""
    code = (
        "import keras, numpy as np, tensorflow as tf\n"
        "from autockpt.integrations import _keras_internals as internals\n"
        "from keras.src.backend.tensorflow.trainer import TFEpochIterator\n"
        "x = np.zeros((32, 2), 'float32')\n"
        "def caveat(data, y=None):\n"
        "    it = TFEpochIterator(x=data, y=y, batch_size=None if y is None else 8, shuffle=True,\n"
        "                         distribute_strategy=tf.distribute.get_strategy())\n"
        "    return internals.mid_epoch_caveat(it)\n"
        "def ds(seed):\n"
        "    ds = tf.data.Dataset.from_tensor_slices((x, x)).shuffle(8, seed=seed)\n"
        "    return ds.map(lambda a, b: (a, b)).batch(4)\n"
        "print('NUMPY_UNSEEDED', caveat(x, x))\n"
        "print('DS_UNSEEDED', caveat(ds(None)))\n"
        "print('DS_OWN_SEED', caveat(ds(3)))\n"
        "class Batches(keras.utils.PyDataset):\n"
        "    def __init__(self): super().__init__()\n"
        "    def __len__(self): return 4\n"
        "    def __getitem__(self, i): return x[i * 8:(i + 1) * 8], x[i * 8:(i + 1) * 8]\n"
        "print('PYDATASET', caveat(Batches()))\n"
        "keras.utils.set_random_seed(1)\n"
        "print('NUMPY_SEEDED', caveat(x, x))\n"
        "print('DS_GLOBAL_SEED', caveat(ds(None)))\n"
    )
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         env=tk._env(TF), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = dict(ln.split(" ", 1) for ln in res.stdout.splitlines() if ln.split(" ")[0].isupper())
    assert "keras.utils.set_random_seed" in got["NUMPY_UNSEEDED"], got
    assert "shuffle(buffer_size, seed=...)" in got["DS_UNSEEDED"], got
    assert "__getitem__(i) depend on i alone" in got["PYDATASET"], got  # prefetched by tf.data in a thread
    assert (got["DS_OWN_SEED"], got["NUMPY_SEEDED"], got["DS_GLOBAL_SEED"]) == ("None", "None", "None"), got


@pytest.mark.skipif(not FULL, reason="long variant: AUTOCKPT_FULL=1")
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


def _pytest_on_tf(selection: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                          capture_output=True, text=True, env=tk._env(TF), timeout=1500, cwd=tk.ROOT)


def test_tf_keras_internals_pinned() -> None:
    """tests/test_keras.py's pins of Keras internals, in a process whose Keras runs on TensorFlow."""
    res = _pytest_on_tf([str(tk.ROOT / "tests" / "test_keras.py"), "-k", "internals_pinned"])
    assert res.returncode == 0 and "2 passed" in res.stdout, (res.stdout + res.stderr)[-4000:]


@pytest.mark.skipif(not FULL, reason="long variant: AUTOCKPT_FULL=1")
def test_tf_whole_keras_suite() -> None:
    """Every test of tests/test_keras.py, in a process whose Keras runs on TensorFlow, but the PyDataset
    kill test: its __getitem__ draws from NumPy's RNG, which tf.data calls ahead in a thread (warned about)."""
    res = _pytest_on_tf([str(tk.ROOT / "tests" / "test_keras.py"), "-k", "not pydataset_fit"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]


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
    tk.signal_in_validation_restore_step_and_epoch_end(tmp_path, tf_windows, tf_window_baseline, step_window=False)


def test_tf_signal_while_async_save_in_flight_and_at_the_end(tmp_path: Path, tf_windows: Any,
                                                              tf_window_baseline: Path) -> None:
    tk.test_signal_while_async_save_in_flight_and_at_the_end(tmp_path, tf_windows, tf_window_baseline)

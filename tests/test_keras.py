"""AutoCheckpoint for Keras 3 (torch backend): exact resume after SIGKILL/SIGTERM, in real subprocesses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
import keras  # noqa: E402

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
    backend = os.environ.get("KERAS_BACKEND", "torch")
    return dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")


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


def _interrupted_matches_uninterrupted(tmp_path: Path, kind: str, plan: Sequence[int]) -> list[tuple[int, int]]:
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
    end, lines = _run(ckpt, out, kind)  # no signal: runs to the end
    assert end == "DONE", lines[-5:]
    last = [(int(ln.split()[1]), int(ln.split()[2])) for ln in lines if ln.startswith("RESUMED")]
    resumes += last
    final_h = json.loads((out.with_suffix(".json")).read_text())
    first = last[0][0] if last else 0
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


def _fit(model: Any, callbacks: list[Any], epochs: int = 2) -> Any:
    x, y = keras_train.data()
    return model.fit(x[:64], y[:64], batch_size=16, epochs=epochs, validation_data=(x[:32], y[:32]),
                     callbacks=callbacks, verbose=0)


def _bucket(s3_server: object) -> tuple[str, dict]:
    """A fresh bucket on the moto server (made with botocore: s3fs' mkdir sends a region moto rejects)."""
    import uuid

    import botocore.session

    name = f"k-{uuid.uuid4().hex[:12]}"
    botocore.session.get_session().create_client(
        "s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",  # type: ignore[attr-defined]
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)
    return f"s3://{name}/run", s3_server.storage_options  # type: ignore[attr-defined]


def test_checkpoint_restores_into_fresh_model_with_plain_manager(s3_server: object) -> None:
    url, opts = _bucket(s3_server)
    keras.utils.set_random_seed(1)
    model = keras_train.build()
    _fit(model, [AutoCheckpoint(url, save_freq="epoch", storage_options=opts)])
    fresh = keras_train.build()  # same code, different initial weights
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True))
    state = keras_state(fresh)
    step = autockpt.CheckpointManager(url, storage_options=opts).restore(state)
    assert step == 8  # 2 epochs of 4 batches
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(fresh.optimizer.variables, model.optimizer.variables, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)), a.path
    assert state["progress"].loaded["epoch"] == 2 and state["progress"].loaded["batch"] == 0
    x, _ = keras_train.data()
    assert np.array_equal(fresh.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0))


def test_mismatched_model_raises_before_touching_it(tmp_path: Path) -> None:
    model = keras_train.build()
    _fit(model, [AutoCheckpoint(tmp_path / "ck", save_freq="epoch")], epochs=1)
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(17), keras.layers.Dense(1)])
    other.compile(optimizer="adam", loss="mse")
    before = [w.copy() for w in other.get_weights()]
    with pytest.raises(StateMismatchError):
        autockpt.CheckpointManager(tmp_path / "ck").restore(keras_state(other))
    with pytest.raises(StateMismatchError):  # the callback refuses too, before the first batch
        _fit(other, [AutoCheckpoint(tmp_path / "ck")], epochs=1)
    assert all(np.array_equal(a, b) for a, b in zip(before, other.get_weights(), strict=True))
    with pytest.raises(StateMismatchError):
        VariablesState(other.weights).load_state_dict({"0000": np.zeros((6, 17), "float32")})


@pytest.mark.parametrize("async_save", [False, True])
def test_finished_run_does_not_train_again_and_fit_is_left_clean(tmp_path: Path, async_save: bool) -> None:
    model = keras_train.build()
    h1 = _fit(model, [AutoCheckpoint(tmp_path / "ck", save_freq=3, max_to_keep=None, async_save=async_save)])
    assert h1.epoch == [0, 1]
    weights = model.get_weights()
    h2 = _fit(model, [AutoCheckpoint(tmp_path / "ck")])  # the same line again: nothing left to do
    assert h2.epoch == []
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))
    h3 = _fit(model, [])  # a later fit without the callback starts at epoch 0 as usual
    assert h3.epoch == [0, 1]
    steps = autockpt.CheckpointManager(tmp_path / "ck").all_steps()
    assert steps == [3, 6, 8]  # every 3 batches, and the end of training


def test_monitor_keeps_best_checkpoint(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    model = keras_train.build()
    hist = _fit(model, [AutoCheckpoint(tmp_path / "ck", monitor="val_loss", max_to_keep=1)], epochs=4)
    best_epoch = int(np.argmin(hist.history["val_loss"]))
    kept = autockpt.CheckpointManager(tmp_path / "ck").all_steps()
    assert kept == sorted({16, 4 * (best_epoch + 1)})  # the newest, and the best by val_loss (4 batches/epoch)


@pytest.mark.parametrize("kwargs", [
    {"save_freq": 0}, {"save_freq": "batch"}, {"save_freq": True}, {"save_freq": 2.5},
    {"mode": "up"}, {"monitor": 3}, {"monitor": ""}, {"keep_best": 0, "monitor": "loss"},
    {"max_to_keep": -1}, {"save_every_seconds": -1.0}, {"async_save": "yes"}, {"signals": ["SIGNOPE"]},
])
def test_bad_arguments_raise_early(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        AutoCheckpoint(tmp_path / "ck", **kwargs)


def test_keras_internals_pinned() -> None:
    """The Keras internals autockpt relies on (see _keras_internals); tested with Keras 3.15.1."""
    print("keras", keras.__version__, "backend", keras.backend.backend())
    seen: dict[str, object] = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs: object = None) -> None:
            loc = internals.find_fit_locals(self.model)
            assert loc is not None
            seen["callbacks"] = [type(c).__name__ for c in loc["callbacks"].callbacks]
            it = loc["epoch_iterator"]
            internals.set_initial_epoch(self.model, 1)
            seen["after"] = 0

            def after() -> None:
                seen["after"] = int(seen["after"]) + 1  # type: ignore[call-overload]
                seen["data_it"] = type(it._current_iterator).__name__
                seen["kind"] = str(getattr(it._current_iterator, "_dataset_kind", None))

            internals.skip_steps_next_epoch(it, 3, after)
            seen["batches"] = []

        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            seen["batches"].append(batch)  # type: ignore[attr-defined]

        def on_train_end(self, logs: object = None) -> None:
            internals.set_initial_epoch(self.model, None)

    model = keras_train.build()
    x, y = keras_train.data()
    hist = model.fit(x[:64], y[:64], batch_size=16, epochs=3, callbacks=[Probe()], verbose=0)
    assert "Probe" in seen["callbacks"] and "History" in seen["callbacks"]  # type: ignore[operator]
    assert hist.epoch == [1, 2]  # fit read model._initial_epoch after on_train_begin
    assert seen["batches"] == [3, 0, 1, 2, 3]  # epoch 1 started at batch 3, epoch 2 was whole
    assert seen["after"] == 1
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 5  # no train step on skipped batches
    if keras.backend.backend() == "torch":  # NumPy input: skipped through the sampler, data not read
        assert seen["kind"] == "0" and seen["data_it"] == "_SingleProcessDataLoaderIter"


def test_stop_training_mid_epoch_by_another_callback_is_not_an_epoch_done(tmp_path: Path) -> None:
    class StopAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            if batch == 1:
                self.model.stop_training = True

    model = keras_train.build()
    _fit(model, [AutoCheckpoint(tmp_path / "ck", save_freq=1), StopAt()], epochs=3)
    mgr = autockpt.CheckpointManager(tmp_path / "ck")
    latest = mgr.latest_step
    assert latest == 2
    assert autockpt.manager.read_manifest(mgr.storage, latest)["metadata"] == {"epoch": 0, "batch": 2}
    hist = _fit(model, [AutoCheckpoint(tmp_path / "ck", save_freq=1)], epochs=3)
    assert hist.epoch == [0, 1, 2]
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 12  # 3 epochs x 4 batches, none twice


def test_generator_input_warns_on_mid_epoch_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            if batch == 2:
                raise RuntimeError("boom")

    x, y = keras_train.data()

    def batches() -> Any:
        while True:
            for i in range(4):
                yield x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]

    model = keras_train.build()
    ck = AutoCheckpoint(tmp_path / "ck", save_freq=3)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(batches(), steps_per_epoch=4, epochs=1, callbacks=[ck, Crash()], verbose=0)
    ck.on_train_end()  # Keras skips on_train_end when fit raises; give the signal handlers back
    with caplog.at_level("WARNING", logger="autockpt"):
        hist = keras_train.build().fit(batches(), steps_per_epoch=4, epochs=1,
                                       callbacks=[AutoCheckpoint(tmp_path / "ck")], verbose=0)
    assert "may not see the same data" in caplog.text and "steps_per_epoch" in caplog.text
    assert hist.epoch == [0]

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

FULL = os.environ.get("AUTOCKPT_FULL") == "1"
TOTAL = keras_train.EPOCHS * (keras_train.N // keras_train.BATCH)


def _env(backend: str | None = None) -> dict[str, str]:
    backend = backend or os.environ.get("KERAS_BACKEND", "torch")
    return dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="",
                TF_CPP_MIN_LOG_LEVEL="2")


def _run(ckpt: Path, out: Path, kind: str, sig: int | None = None, at: int = 0, tag: str = "",
         backend: str | None = None, stderr: list[str] | None = None) -> tuple[str, list[str]]:
    """Run the child; send ``sig`` once it reports global batch >= ``at``. Returns (how it ended, lines).

    A SIGTERM that stopped training ends the child with exit code 143 once its checkpoint is committed: the
    code after ``fit`` does not run, so it returns ("preempted", lines). The child's stderr is appended to
    ``stderr`` if given."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(ckpt), str(out), kind, "0.03" if sig else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(backend),
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
    if stderr is not None:
        stderr.append(err)
    if sig == signal.SIGKILL and sent:
        assert rc == -signal.SIGKILL, (rc, err[-2000:], tag)
        return "killed", lines
    if sig == signal.SIGTERM and sent:
        assert rc == 128 + signal.SIGTERM, (rc, err[-3000:], tag)
        assert not any(ln in ("DONE", "PREEMPTED") for ln in lines), (lines[-5:], tag)  # nothing after fit ran
        return "preempted", lines
    assert rc == 0, (err[-3000:], tag)
    return lines[-1], lines


def _weights(prefix: Path) -> list[np.ndarray]:
    with np.load(str(prefix) + ".npz", allow_pickle=False) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _interrupted_matches_uninterrupted(
    tmp_path: Path, kind: str, plan: Sequence[int], seed: int, backend: str | None = None
) -> list[tuple[int, int]]:
    tag = f"seed {seed}"
    base_end, _ = _run(tmp_path / "base_ckpt", tmp_path / "base", kind, tag=tag, backend=backend)
    assert base_end == "DONE", tag
    base_w = _weights(tmp_path / "base")
    base_h = json.loads((tmp_path / "base.json").read_text())
    assert base_h["epoch"] == list(range(keras_train.EPOCHS)), tag

    rng = random.Random(seed)
    ckpt, out = tmp_path / "ckpt", tmp_path / "run"
    resumes: list[tuple[int, int]] = []
    reached = 0
    for sig in plan:  # each at a random batch, mid-epoch or not; the first after the first checkpoint (batch 3)
        at = rng.randrange(reached + 2, reached + 14) if reached else rng.randrange(5, 14)
        end, lines = _run(ckpt, out, kind, sig, at, tag=tag, backend=backend)
        resumes += [(int(ln.split()[1]), int(ln.split()[2])) for ln in lines if ln.startswith("RESUMED")]
        batches = [int(ln.split()[1]) for ln in lines if ln.startswith("BATCH")]
        assert batches, (lines, tag)
        reached = max(batches)
        assert end in ("killed", "preempted"), (sig, end, lines[-5:], tag)
    end, lines = _run(ckpt, out, kind, tag=tag, backend=backend)  # no signal: runs to the end
    assert end == "DONE", (lines[-5:], tag)
    last = [(int(ln.split()[1]), int(ln.split()[2])) for ln in lines if ln.startswith("RESUMED")]
    resumes += last
    final_h = json.loads((out.with_suffix(".json")).read_text())
    # The last run's History holds the epochs of the earlier processes too, each once, with the same values.
    assert final_h["epoch"] == list(range(keras_train.EPOCHS)), (final_h["epoch"], resumes, tag)
    for k, v in final_h["history"].items():
        assert v == base_h["history"][k], (k, v, base_h["history"][k], tag)
    assert final_h["history"].keys() == base_h["history"].keys(), tag
    assert final_h["best"] == base_h["best"], (final_h["best"], base_h["best"], tag)
    assert final_h["iterations"] == base_h["iterations"] == TOTAL, tag
    w = _weights(out)
    assert len(w) == len(base_w), tag
    for a, b in zip(w, base_w, strict=True):
        assert np.array_equal(a, b), f"weights differ after resuming ({tag}, resumes {resumes})"
    return resumes


def test_numpy_fit_resumes_exactly_after_sigkill_and_sigterm(tmp_path: Path, seed: int) -> None:
    plan = [signal.SIGKILL, signal.SIGTERM] * (2 if FULL else 1)  # the suite's time: twice under AUTOCKPT_FULL=1
    resumes = _interrupted_matches_uninterrupted(tmp_path, "numpy", plan, seed)
    assert len(resumes) >= len(plan), f"seed {seed}"
    assert any(b > 0 for _, b in resumes), f"no mid-epoch resume happened: {resumes} (seed {seed})"


@pytest.mark.full
def test_pydataset_fit_resumes_exactly(tmp_path: Path, seed: int) -> None:
    resumes = _interrupted_matches_uninterrupted(tmp_path, "pydataset", [signal.SIGTERM, signal.SIGKILL], seed)
    assert len(resumes) >= 2, f"seed {seed}"


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


def _mixed_model() -> keras.Model:
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, dtype="bfloat16"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _as_float(v: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(v, "float32")))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch backend's variables")
def test_torch_backend_saves_and_restores_the_variables_own_memory(tmp_path: Path) -> None:
    """No copy of the model in the foreground of a save, none on restore: the checkpoint reads the variables'
    own tensors (bfloat16 ones too) and the restore reads into them; a checkpoint of NumPy copies (what
    VariablesState saved before) still restores."""
    keras.utils.set_random_seed(3)
    x, y = keras_train.data()
    model = _mixed_model()
    model.fit(x[:32], y[:32], batch_size=16, epochs=1, verbose=0)
    saved = VariablesState(model.variables).state_dict()
    assert "bfloat16" in {str(v.dtype) for v in model.variables}
    for i, var in enumerate(model.variables):
        assert saved[f"{i:04d}"].data_ptr() == internals.variable_storage(var).data_ptr(), var.path
    autockpt.CheckpointManager(tmp_path / "ck").save(1, {"model": VariablesState(model.variables)})
    float_vars = [v for v in model.variables if v.dtype != "bfloat16"]
    autockpt.CheckpointManager(tmp_path / "old").save(1, {"model": {f"{i:04d}": _as_float(v) for i, v in
                                                                     enumerate(float_vars)}})

    fresh = _mixed_model()
    where = [internals.variable_storage(v).data_ptr() for v in fresh.variables]
    assert not all(np.array_equal(_as_float(a), _as_float(b)) for a, b in zip(fresh.variables, model.variables,
                                                                              strict=True))
    assert autockpt.CheckpointManager(tmp_path / "ck").restore({"model": VariablesState(fresh.variables)}) == 1
    for a, b in zip(fresh.variables, model.variables, strict=True):
        assert a.dtype == b.dtype and np.array_equal(_as_float(a), _as_float(b)), a.path
    assert [internals.variable_storage(v).data_ptr() for v in fresh.variables] == where
    assert np.array_equal(fresh.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0))

    again = [v for v in _mixed_model().variables if v.dtype != "bfloat16"]
    assert autockpt.CheckpointManager(tmp_path / "old").restore({"model": VariablesState(again)}) == 1
    for a, b in zip(again, float_vars, strict=True):
        assert np.array_equal(_as_float(a), _as_float(b)), a.path


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
    batches: list[int] = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(batch))
    h2 = _fit(model, [AutoCheckpoint(tmp_path / "ck"), counter])  # the same line again: nothing left to do
    assert batches == []  # no batch trained (History is restored: h2 holds the epochs of the first fit)
    assert h2.epoch == [0, 1] and h2.history == h1.history
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
    kernel = internals.variable_storage(model.weights[0])
    before = None if kernel is None else kernel.clone()
    hist = model.fit(x[:64], y[:64], batch_size=16, epochs=3, callbacks=[Probe()], verbose=0)
    if keras.backend.backend() == "torch":  # training updates the variable's own tensor in place
        assert kernel is not None and not kernel.equal(before)
        assert np.array_equal(kernel.numpy(), keras.ops.convert_to_numpy(model.weights[0]))
    else:
        assert kernel is None
    assert "Probe" in seen["callbacks"] and "History" in seen["callbacks"]  # type: ignore[operator]
    assert hist.epoch == [1, 2]  # fit read model._initial_epoch after on_train_begin
    assert seen["batches"] == [3, 0, 1, 2, 3]  # epoch 1 started at batch 3, epoch 2 was whole
    assert seen["after"] == 1
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 5  # no train step on skipped batches
    if keras.backend.backend() == "torch":  # NumPy input: skipped through the sampler, data not read
        assert seen["kind"] == "0" and seen["data_it"] == "_SingleProcessDataLoaderIter"
    if keras.backend.backend() == "tensorflow":  # fit's tf.data dataset, and how it makes iterators of it
        assert seen["data_it"] == "OwnedIterator", seen
        counted: list[int] = []

        class Count(keras.callbacks.Callback):
            def on_train_begin(self, logs: object = None) -> None:
                loc = internals.find_fit_locals(self.model)
                assert loc is not None and internals._tf_dataset(loc["epoch_iterator"]) is not None
                self.count = internals.count_iterators(loc["epoch_iterator"])

            def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
                assert self.count is not None
                counted.append(self.count())

        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).shuffle(64, seed=1).batch(16)
        model.fit(ds, epochs=3, shuffle=False, callbacks=[Count()], verbose=0)
        assert counted == [0, 2, 4], counted  # Keras 3.15: two iterators per epoch (replay counts them anyway)


def test_keras_hook_internals_pinned() -> None:
    """fit calls hooks through its CallbackList instance and asks model._should_eval (see _keras_internals)."""
    order: list[str] = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs: object = None) -> None:
            loc = internals.find_fit_locals(self.model)
            assert loc is not None

            def after_epoch_end(original: Any, epoch: int, logs: object = None) -> None:
                original(epoch, logs)
                order.append(f"after all on_epoch_end {epoch}")
                internals.skip_validation(self.model, epoch == 0)  # validate epoch 0 and 2, not epoch 1

            self.undo = internals.intercept(loc["callbacks"], {"on_epoch_end": after_epoch_end})

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            order.append(f"probe {epoch}")

        def on_test_begin(self, logs: object = None) -> None:
            order.append("validation")

        def on_train_end(self, logs: object = None) -> None:
            self.undo()
            internals.skip_validation(self.model, False)

    later = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: order.append(f"later {epoch}"))
    x, y = keras_train.data()
    model = keras_train.build()
    model.fit(x[:32], y[:32], batch_size=16, epochs=3, validation_data=(x[:16], y[:16]), callbacks=[Probe(), later],
              verbose=0)
    assert order == ["validation", "probe 0", "later 0", "after all on_epoch_end 0",
                     "probe 1", "later 1", "after all on_epoch_end 1",
                     "validation", "probe 2", "later 2", "after all on_epoch_end 2"], order
    assert "_should_eval" not in model.__dict__


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
    # step 2 is saved; the crash in a later callback's hook of step 3 keeps that step from being saved (the
    # checkpoint is taken after every callback's hook)
    ck = AutoCheckpoint(tmp_path / "ck", save_freq=2)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(batches(), steps_per_epoch=4, epochs=1, callbacks=[ck, Crash()], verbose=0)
    ck.on_train_end()  # Keras skips on_train_end when fit raises; give the signal handlers back
    with caplog.at_level("WARNING", logger="autockpt"):
        hist = keras_train.build().fit(batches(), steps_per_epoch=4, epochs=1,
                                       callbacks=[AutoCheckpoint(tmp_path / "ck")], verbose=0)
    assert "may not see the same data" in caplog.text and "steps_per_epoch" in caplog.text
    assert hist.epoch == [0]


# ------------------------------------------------------------------------------------------------------------
# Callback order, finished runs, preemption: exit codes, partial epochs, every window (issues 18 and 19)

WINDOWS = ROOT / "tests" / "scripts" / "keras_windows.py"
import keras_windows  # noqa: E402


class _Recorder(keras.callbacks.Callback):
    """Records, after every other callback's on_epoch_end, the state the epoch-end checkpoint must hold."""

    def __init__(self, stop: Any = None, plateau: Any = None) -> None:
        super().__init__()
        self.stop, self.plateau = stop, plateau
        self.after_epoch: list[dict[str, Any]] = []
        self.batches = 0
        self.epoch_ends: list[int] = []
        self.validations = 0
        self.train_ended = False

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.batches += 1

    def on_test_begin(self, logs: object = None) -> None:
        self.validations += 1

    def on_epoch_end(self, epoch: int, logs: object = None) -> None:
        self.epoch_ends.append(epoch)
        if self.stop is None or self.plateau is None:
            return
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.after_epoch.append({"es": (self.stop.wait, float(self.stop.best)), "lr": lr,
                                 "rlrop": (self.plateau.wait, float(self.plateau.best))})

    def on_train_end(self, logs: object = None) -> None:
        self.train_ended = True


@pytest.mark.parametrize("order", ["checkpoint_first", "checkpoint_last"])
def test_epoch_end_checkpoint_holds_every_callbacks_state_whatever_the_order(tmp_path: Path, order: str) -> None:
    keras.utils.set_random_seed(4)
    model = keras_windows.build()
    ck = AutoCheckpoint(tmp_path / "ck", save_freq="epoch", max_to_keep=None)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=50)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=0, factor=0.5, min_delta=10.0)
    rec = _Recorder(stop, plateau)
    others = [stop, plateau]
    x, y = keras_windows.data()
    model.fit(x[:64], y[:64], batch_size=16, epochs=3, validation_data=(x[64:], y[64:]), verbose=0,
              callbacks=[ck, *others, rec] if order == "checkpoint_first" else [*others, rec, ck])
    assert autockpt.CheckpointManager(tmp_path / "ck").all_steps() == [4, 8, 12]
    for epoch, want in enumerate(rec.after_epoch):
        saved = autockpt.load(str(tmp_path / "ck"), 4 * (epoch + 1))
        es, rl = saved["callbacks"]["EarlyStopping_0"], saved["callbacks"]["ReduceLROnPlateau_0"]
        assert (es["wait"], es["best"]) == want["es"], (order, epoch, es, want)
        assert (rl["wait"], rl["best"]) == want["rlrop"], (order, epoch, rl, want)
        lr = [v for v, var in zip(saved["optimizer"].values(), model.optimizer.variables, strict=True)
              if var.path.endswith("learning_rate")]
        assert [float(np.asarray(v)) for v in lr] == [want["lr"]], (order, epoch, lr, want)
        assert saved["callbacks"]["History_0"]["epoch"] == list(range(epoch + 1)), (order, epoch)


def test_run_stopped_by_early_stopping_is_finished(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def fit() -> tuple[Any, Any, _Recorder]:
        keras.utils.set_random_seed(2)
        model = keras_windows.build()
        stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=1e9)  # stops after epoch 1
        rec = _Recorder()
        x, y = keras_windows.data()
        hist = model.fit(x[:64], y[:64], batch_size=16, epochs=6, verbose=0,
                         callbacks=[AutoCheckpoint(tmp_path / "ck", save_freq=3), stop, rec])
        return model, hist, rec

    model, hist, rec = fit()
    assert hist.epoch == [0, 1] and rec.batches == 8  # EarlyStopping ended the run after 2 of 6 epochs
    with caplog.at_level("INFO", logger="autockpt"):
        again, hist2, rec2 = fit()  # the same code again: the run is finished, nothing trains
    assert rec2.batches == 0 and rec2.epoch_ends == []
    assert int(keras.ops.convert_to_numpy(again.optimizer.iterations)) == 8
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights(), strict=True))
    assert hist2.epoch == [0, 1] and hist2.history == hist.history  # model.history: the earlier process's epochs
    lines = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert lines == [f"autockpt: resumed from step 8 of {tmp_path / 'ck'}: the run finished (a callback stopped "
                     "it after epoch 2); nothing to train"], lines
    assert autockpt.CheckpointManager(tmp_path / "ck").all_steps()[-1] == 8


class _SignalAt(keras.callbacks.Callback):
    def __init__(self, batch: int, sig: int = signal.SIGTERM) -> None:
        super().__init__()
        self.batch, self.sig, self.sent = batch, sig, False

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        if batch == self.batch and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


def test_preemption_exit_code_and_partial_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = keras_windows.data()

    def fit(callbacks: list[Any], model: Any = None) -> Any:
        return (model or keras_windows.build()).fit(x[:64], y[:64], batch_size=16, epochs=2, verbose=0,
                                                    validation_data=(x[64:], y[64:]), callbacks=callbacks)

    keras.utils.set_random_seed(8)
    base_model = keras_windows.build()
    base = fit([], base_model)
    # exit_on_preemption=False (notebooks): fit returns; the partial epoch is neither validated nor ended
    keras.utils.set_random_seed(8)
    ck = AutoCheckpoint(tmp_path / "ck", exit_on_preemption=False)
    rec = _Recorder()
    with caplog.at_level("INFO", logger="autockpt"):
        hist = fit([ck, _SignalAt(1, signal.SIGUSR1), rec])
    assert ck.preempted and ck.exit_code == 128 + signal.SIGUSR1
    assert rec.batches == 2 and rec.validations == 0 and rec.epoch_ends == [] and rec.train_ended
    assert hist.epoch == []
    assert f"autockpt: SIGUSR1: saved step 2 to {tmp_path / 'ck'}; stopping (exit code 138)" in caplog.messages
    # the default: SystemExit(143) once fit's teardown (every on_train_end) ran; the code after fit does not run
    keras.utils.set_random_seed(8)
    rec = _Recorder()
    caplog.clear()
    with caplog.at_level("INFO", logger="autockpt"), pytest.raises(SystemExit) as exit_info:
        fit([AutoCheckpoint(tmp_path / "ck"), _SignalAt(2), rec])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert rec.batches == 1 and rec.epoch_ends == [] and rec.validations == 0 and rec.train_ended
    assert [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()] == [
        f"autockpt: resumed from step 2 of {tmp_path / 'ck'} (epoch 0, batch 2)"]
    assert f"autockpt: SIGTERM: saved step 3 to {tmp_path / 'ck'}; stopping (exit code 143)" in caplog.messages
    # resumed to the end: History holds both epochs, each once; weights as if never stopped
    keras.utils.set_random_seed(8)
    model = keras_windows.build()
    ck = AutoCheckpoint(tmp_path / "ck")
    hist = fit([ck], model)
    assert not ck.preempted and ck.exit_code == 0
    assert hist.epoch == [0, 1] and hist.history == base.history
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), base_model.get_weights(), strict=True))


def test_mismatch_names_keras_variables_by_path(tmp_path: Path) -> None:
    model = keras_train.build()
    _fit(model, [AutoCheckpoint(tmp_path / "ck", save_freq="epoch")], epochs=1)
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(17), keras.layers.Dense(1)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(StateMismatchError) as info:
        _fit(other, [AutoCheckpoint(tmp_path / "ck")], epochs=1)
    kernel = other.layers[0].kernel.path  # e.g. "sequential_3/dense_7/kernel"
    assert any(m.startswith(f"model/0000 {kernel} (") for m in info.value.mismatched), info.value.mismatched
    assert f"model/0000 {kernel}" in str(info.value) and "same code" in str(info.value)
    assert any("momentum" in m for m in info.value.mismatched), info.value.mismatched  # optimizer variables too


def test_mismatch_through_a_plain_manager_names_keras_variables_by_path(tmp_path: Path) -> None:
    model = keras_train.build()
    _fit(model, [AutoCheckpoint(tmp_path / "ck", save_freq="epoch")], epochs=1)
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(17), keras.layers.Dense(1)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(StateMismatchError) as info:
        autockpt.CheckpointManager(tmp_path / "ck").restore(keras_state(other))
    kernel = other.layers[0].kernel.path  # e.g. "sequential_3/dense_7/kernel"
    assert kernel.endswith("/kernel")
    assert any(m.startswith(f"model/0000 {kernel} (") for m in info.value.mismatched), info.value.mismatched
    assert f"model/0000 {kernel} (" in str(info.value)


@pytest.fixture(scope="module")
def windows() -> Any:
    """keras_windows.py --serve: runs each window in a new process forked after Keras was imported."""
    proc = subprocess.Popen([sys.executable, str(WINDOWS), "--serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=60)


def _window(server: Any, ckpt: Path, out: Path, window: str, async_save: bool = False) -> tuple[int, str, list[str]]:
    """Run ``window`` (see keras_windows.py) in a new process: (exit code, stdout, autockpt's stop lines)."""
    server.stdin.write(f"{ckpt} {out} {window}{' async' if async_save else ''}\n")
    server.stdin.flush()
    rc = int(server.stdout.readline())
    stdout, stderr = Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text()
    assert "Traceback" not in stderr, stderr[-3000:]
    return rc, stdout, [ln for ln in stderr.splitlines() if ln.startswith("autockpt: SIG")]


@pytest.fixture(scope="module")
def window_baseline(windows: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of keras_windows.py: OUT.npz and OUT.json."""
    out = tmp_path_factory.mktemp("windows") / "base"
    rc, stdout, stops = _window(windows, out.parent / "ck", out, "none")
    assert rc == 0 and "AFTER FIT" in stdout and stops == [], (rc, stdout[-2000:])
    return out


def _same_as_baseline(out: Path, base: Path, stdout: str) -> None:
    assert "AFTER FIT" in stdout and "BATCH" not in stdout, stdout[-2000:]  # the finished run trained nothing
    got, want = json.loads(out.with_suffix(".json").read_text()), json.loads(base.with_suffix(".json").read_text())
    assert got == want  # History of every epoch (each once), EarlyStopping.best, learning rate, iterations
    for a, b in zip(_weights(out), _weights(base), strict=True):
        assert np.array_equal(a, b), "weights differ from the uninterrupted run"


def _saved(ck: Path, name: str, step: int) -> str:
    return f"autockpt: {name}: saved step {step} to {ck}; stopping (exit code {128 + getattr(signal, name)})"


def _nothing_since(ck: Path, name: str, step: int) -> str:
    return (f"autockpt: {name}: no step completed since step {step} (the newest checkpoint in {ck}); stopping "
            f"(exit code {128 + getattr(signal, name)})")


def test_signal_in_validation_restore_step_and_callback_epoch_end(tmp_path: Path, windows: Any,
                                                                  window_baseline: Path) -> None:
    signal_in_validation_restore_step_and_epoch_end(tmp_path, windows, window_baseline)


def signal_in_validation_restore_step_and_epoch_end(tmp_path: Path, windows: Any, window_baseline: Path,
                                                    step_window: bool = True) -> None:
    """One run after another in one directory, each signalling itself at another moment, then to the end.
    ``step_window=False`` leaves out the signal from inside ``train_step`` (on TensorFlow the step is a traced
    ``tf.function``: Python code in it runs once, while tracing)."""
    ck, out = tmp_path / "ck", tmp_path / "run"
    newest = lambda: autockpt.CheckpointManager(ck).latest_step  # noqa: E731
    # during validation of epoch 0: validation finishes, the epoch-end checkpoint is committed, exit 143
    rc, stdout, stops = _window(windows, ck, out, "validation:SIGTERM:0")
    assert (rc, stops, newest()) == (143, [_saved(ck, "SIGTERM", 4)], 4), stdout[-1500:]
    assert "AFTER FIT" not in stdout and "EPOCH_END 0" in stdout
    # during the restore at the start: nothing trains, the checkpoint stays as it was, exit 138
    rc, stdout, stops = _window(windows, ck, out, "restore:SIGUSR1:0")
    assert (rc, stops, newest()) == (138, [_nothing_since(ck, "SIGUSR1", 4)], 4), stdout[-1500:]
    assert "BATCH" not in stdout and "AFTER FIT" not in stdout
    # inside the training step that starts at step 6 (epoch 1, batch 2): that step finishes and is committed
    if step_window:
        rc, stdout, stops = _window(windows, ck, out, "step:SIGUSR1:6")
        assert "STEPSIGNAL 6" in stdout, stdout[-1500:]
        assert (rc, stops, newest()) == (138, [_saved(ck, "SIGUSR1", 7)], 7), stdout[-1500:]
        assert "BATCH 1 2" in stdout and "BATCH 1 3" not in stdout and "AFTER FIT" not in stdout
    # in another callback's on_epoch_end (listed after AutoCheckpoint), epoch 1
    rc, stdout, stops = _window(windows, ck, out, "epoch_end:SIGTERM:1")
    assert (rc, stops, newest()) == (143, [_saved(ck, "SIGTERM", 8)], 8), stdout[-1500:]
    assert "BATCH 1 3" in stdout and "BATCH 2 0" not in stdout
    assert ("BATCH 1 2" not in stdout) if step_window else ("BATCH 1 0" in stdout)
    rc, stdout, stops = _window(windows, ck, out, "none")  # the identical command, to the end
    assert (rc, stops) == (0, []), stdout[-1500:]
    assert "EPOCH_END 1" not in stdout and "EPOCH_END 3" in stdout
    json_out = json.loads(out.with_suffix(".json").read_text())
    assert json_out["epoch"] == [0, 1, 2, 3]
    for a, b in zip(_weights(out), _weights(window_baseline), strict=True):
        assert np.array_equal(a, b), "weights differ from the uninterrupted run"
    assert json_out == json.loads(window_baseline.with_suffix(".json").read_text())


def test_signal_while_async_save_in_flight_and_at_the_end(tmp_path: Path, windows: Any,
                                                           window_baseline: Path) -> None:
    ck, out = tmp_path / "ck", tmp_path / "run"
    newest = lambda: autockpt.CheckpointManager(ck).latest_step  # noqa: E731
    # at the batch after step 2, while step 2 is being written: step 3 is saved; epoch 0 is not ended
    rc, stdout, stops = _window(windows, ck, out, "inflight_batch:SIGTERM:2", async_save=True)
    assert "INFLIGHT 2 yes" in stdout, stdout[-1500:]
    assert (rc, stops, newest()) == (143, [_saved(ck, "SIGTERM", 3)], 3), stdout[-1500:]
    assert "VAL 0" not in stdout and "EPOCH_END 0" not in stdout  # the partial epoch: no validation, no end
    # at the start of epoch 1, while the epoch-0 checkpoint (step 4) is being written
    rc, stdout, stops = _window(windows, ck, out, "inflight_epoch:SIGUSR1:1", async_save=True)
    assert "INFLIGHT 4 yes" in stdout, stdout[-1500:]
    assert (rc, stops, newest()) == (138, [_saved(ck, "SIGUSR1", 5)], 5), stdout[-1500:]
    assert stdout.count("EPOCH_END 0") == 1 and "EPOCH_END 1" not in stdout
    # at the very end of training (another callback's on_train_end): the last step is committed
    rc, stdout, stops = _window(windows, ck, out, "train_end:SIGTERM:0", async_save=True)
    assert (rc, stops, newest()) == (143, [_nothing_since(ck, "SIGTERM", 16)], 16), stdout[-1500:]
    assert "EPOCH_END 3" in stdout and "AFTER FIT" not in stdout
    rc, stdout, stops = _window(windows, ck, out, "none", async_save=True)  # the identical command: trains nothing
    assert (rc, stops) == (0, []), stdout[-1500:]
    _same_as_baseline(out, window_baseline, stdout)

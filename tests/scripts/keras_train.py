"""Child process for tests/test_keras.py: trains a tiny Keras model with AutoCheckpoint, resumable.

Usage: keras_train.py DIRECTORY OUT_PREFIX DATA(numpy|pydataset|tfdata|tfdata_unseeded) [SLEEP]

``tfdata`` (TensorFlow backend): ``from_tensor_slices(...).shuffle(N, seed=11).map(...).batch(BATCH)``;
``tfdata_unseeded``: the same with ``shuffle(N)`` and no global seed for TensorFlow.
Prints "BATCH <global batch>" after every batch, "RESUMED <epoch> <batch>" after a restore, and
"DONE"/"PREEMPTED" at the end; writes OUT_PREFIX.npz (final weights) and OUT_PREFIX.json (History). A
SIGTERM ends it with exit code 143 once the checkpoint is committed (AutoCheckpoint's default), before
anything after ``fit`` runs.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from autockpt.integrations.keras import AutoCheckpoint  # noqa: E402

EPOCHS, BATCH, N = 3, 16, 320  # 20 batches per epoch


def data() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(123)
    x = rs.rand(N, 6).astype("float32")
    y = (x @ rs.rand(6, 1) + 0.1 * rs.rand(N, 1)).astype("float32")
    return x, y


class Batches(keras.utils.PyDataset):
    """A PyDataset whose batches also draw from NumPy's global RNG (noise augmentation)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x) // BATCH

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(i * BATCH, (i + 1) * BATCH)
        return self.x[sl] + np.random.normal(0, 0.01, self.x[sl].shape).astype("float32"), self.y[sl]


def tf_dataset(x: np.ndarray, y: np.ndarray, seed: int | None = 11) -> object:
    """The tf.data pipeline users write most often: slices, a seeded shuffle, a map, batches."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    return ds.map(lambda a, b: (a * 2.0 - 1.0, b), num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)


def build() -> keras.Model:
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1),
    ])
    lr = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=7, decay_rate=0.9)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse", metrics=["mae"])
    return model


class Report(keras.callbacks.Callback):
    def __init__(self, ckpt: AutoCheckpoint, sleep: float) -> None:
        super().__init__()
        self.ckpt, self.sleep = ckpt, sleep
        self.first = True

    def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
        if self.first and self.ckpt.restored_step is not None:
            print(f"RESUMED {epoch} {self.ckpt._batch}", flush=True)
        self.first = False

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        print(f"BATCH {int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))}", flush=True)
        time.sleep(self.sleep)


def main() -> None:
    directory, out, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    if kind == "tfdata_unseeded":
        import random

        random.seed(7)  # Python, NumPy and Keras' seed generator as usual; TensorFlow's global seed stays unset
        np.random.seed(7)
    else:
        keras.utils.set_random_seed(7)
    x, y = data()
    model = build()
    ckpt = AutoCheckpoint(directory, save_freq=3, max_to_keep=2)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=50)
    callbacks = [ckpt, stop, Report(ckpt, sleep)]
    val = (x[:64], y[:64])
    if kind == "numpy":
        hist = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, validation_data=val, callbacks=callbacks, verbose=0)
    elif kind.startswith("tfdata"):
        ds = tf_dataset(x, y, seed=11 if kind == "tfdata" else None)
        hist = model.fit(ds, epochs=EPOCHS, shuffle=False, validation_data=val, callbacks=callbacks, verbose=0)
    else:
        hist = model.fit(Batches(x, y), epochs=EPOCHS, validation_data=val, callbacks=callbacks, verbose=0)
    np.savez(out + ".npz", *[np.asarray(w) for w in model.get_weights()])
    with open(out + ".json", "w") as f:
        json.dump({"epoch": hist.epoch, "history": hist.history, "best": float(stop.best),
                   "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations))}, f)
    print("PREEMPTED" if ckpt.preempted else "DONE", flush=True)


if __name__ == "__main__":
    main()

"""Keras 3 ``model.fit`` that survives being killed: run it, kill it (Ctrl-\\, kill -9, or kill -TERM), run again.

    KERAS_BACKEND=torch python examples/keras_fit.py /tmp/keras_fit_demo          # NumPy arrays
    KERAS_BACKEND=torch python examples/keras_fit.py /tmp/keras_fit_demo2 --pydataset

Each run resumes where the last one stopped, mid-epoch included: same weights, optimizer, learning-rate
schedule position, shuffling order, dropout masks and EarlyStopping state as if it had never stopped. After
kill -TERM the process exits with code 143 once its checkpoint is committed; once EarlyStopping ended the
run, running it again trains nothing.
The directory can be any fsspec URL, e.g. s3://bucket/run3 (no TensorFlow needed).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from autockpt.integrations.keras import AutoCheckpoint  # noqa: E402


class Batches(keras.utils.PyDataset):
    """A PyDataset needs no wrapper: AutoCheckpoint replays its shuffle and skips the batches already done."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int = 32) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], self.y[s]


def main() -> None:
    directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp/keras_fit_demo"
    keras.utils.set_random_seed(0)  # the same seed every run: restored RNG state takes over on resume
    rs = np.random.RandomState(0)
    x = rs.rand(4096, 20).astype("float32")
    y = (x @ rs.rand(20, 1)).astype("float32")

    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(1),
    ])
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=2000)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")

    callbacks = [
        AutoCheckpoint(directory, save_freq=50, max_to_keep=3, monitor="val_loss"),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=3),
    ]
    data = (Batches(x[:3584], y[:3584]),) if "--pydataset" in sys.argv else (x[:3584], y[:3584])
    history = model.fit(*data, batch_size=None if len(data) == 1 else 32, epochs=20,
                        validation_data=(x[3584:], y[3584:]), callbacks=callbacks, verbose=2)
    # kill -TERM (or SIGUSR1) ends the process inside fit, once the checkpoint is committed, with exit code
    # 143 (138): a scheduler restarts it, and the lines below run only when training is done.
    # AutoCheckpoint(..., exit_on_preemption=False) returns from fit instead (callbacks[0].preempted).
    print("done; epochs (of every process that trained this run):", history.epoch)


if __name__ == "__main__":
    main()

"""Child process for tests/test_keras.py: a tiny ``fit`` that sends a signal to ITSELF at one chosen moment.

Usage: keras_windows.py DIRECTORY OUT_PREFIX WINDOW [async]
   or: keras_windows.py --serve   (runs such lines from stdin, each in a new process: see ``serve``)

WINDOW is ``none`` or ``NAME:SIGNAL:N``; the signal is sent by ``Signaller`` (listed after AutoCheckpoint,
EarlyStopping and ReduceLROnPlateau), for ``restore`` by a profile hook, for ``step`` by ``model.train_step``:

- ``step:SIG:S``            inside the training step that starts at step S (in ``model.train_step``, before its
  forward pass: the signal arrives while Keras runs the step, not in a callback hook)
- ``validation:SIG:E``      in the first validation batch of epoch E
- ``epoch_end:SIG:E``       in the Signaller's ``on_epoch_end`` of epoch E (after AutoCheckpoint's own hook)
- ``restore:SIG:0``         while AutoCheckpoint restores the checkpoint at the start of fit
- ``train_end:SIG:0``       in the Signaller's ``on_train_end`` (the very end of training)
- ``inflight_batch:SIG:S``  at the batch after step S, while the (async) save of step S is being written
- ``inflight_epoch:SIG:E``  at the start of epoch E, while the save of epoch E-1's end is being written
  (``HoldWrites`` keeps that save's thread at its first fsync until the signal is sent)

Prints ``BATCH <epoch> <batch>`` per trained batch, ``VAL <epoch>`` per validation, ``EPOCH_END <epoch>`` per
``on_epoch_end``, ``INFLIGHT <step> <yes|no>`` when it signals during a save, and ``AFTER FIT`` after writing
OUT_PREFIX.npz (weights) and OUT_PREFIX.json (History and more) once ``fit`` returned. Logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from hold_writes import HoldWrites  # noqa: E402

from autockpt.integrations import keras as autockpt_keras  # noqa: E402

EPOCHS, BATCH, N = 4, 16, 64  # 4 batches per epoch, 16 steps


def data() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(5)
    x = rs.rand(N + 32, 6).astype("float32")
    y = (x @ rs.rand(6, 1) + 0.1 * rs.rand(N + 32, 1)).astype("float32")
    return x, y


def build() -> keras.Model:
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"])
    return model


class Signaller(keras.callbacks.Callback):
    def __init__(self, ck: autockpt_keras.AutoCheckpoint, name: str, sig: int, n: int) -> None:
        super().__init__()
        self.ck, self.name, self.sig, self.n = ck, name, sig, n
        self.epoch = -1
        self.hold = HoldWrites()
        self.hold.install()

    def _steps(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _send(self, inflight: int | None = None) -> None:
        if inflight is not None:
            done = inflight in self.ck.manager.all_steps()
            print(f"INFLIGHT {inflight} {'no' if done else 'yes'}", flush=True)
        os.kill(os.getpid(), self.sig)
        self.hold.release()
        self.name = "sent"

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch
        if self.name == "inflight_epoch" and epoch == self.n:
            self._send(inflight=self._steps())

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.name == "inflight_batch" and self._steps() == self.n:
            self._send(inflight=self.n)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        print(f"BATCH {self.epoch} {batch}", flush=True)
        if self.name == "inflight_batch" and self._steps() == self.n:
            self.hold.holding = True  # AutoCheckpoint saves step n after this hook: hold that write

    def on_test_begin(self, logs: Any = None) -> None:
        print(f"VAL {self.epoch}", flush=True)

    def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.name == "validation" and self.epoch == self.n:
            self._send()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        print(f"EPOCH_END {epoch}", flush=True)
        if self.name == "inflight_epoch" and epoch + 1 == self.n:
            self.hold.holding = True  # the epoch-end save comes after this hook: hold that write
        if self.name == "epoch_end" and epoch == self.n:
            self._send()

    def on_train_end(self, logs: Any = None) -> None:
        if self.name == "train_end":
            self._send()


def signal_in_train_step(model: keras.Model, sig: int, n: int) -> None:
    """Send ``sig`` from inside ``model.train_step`` when the step that starts at step ``n`` runs (an instance
    attribute: Keras' torch trainer calls ``self.train_step`` at every step)."""
    train_step = model.train_step

    def step(data: Any) -> Any:
        if int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == n:
            model.train_step = train_step
            print(f"STEPSIGNAL {n}", flush=True)
            os.kill(os.getpid(), sig)
        return train_step(data)

    model.train_step = step


def signal_during_restore(sig: int) -> None:
    """Send ``sig`` when the restore starts assigning the model's variables (a profile hook, removed after)."""
    code = autockpt_keras.VariablesState.load_state_dict.__code__

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            sys.setprofile(None)
            os.kill(os.getpid(), sig)

    sys.setprofile(hook)


def main(argv: list[str]) -> None:
    directory, out, window = argv[0], argv[1], argv[2]
    async_save = len(argv) > 3 and argv[3] == "async"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    keras.utils.set_random_seed(11)
    x, y = data()
    model = build()
    ck = autockpt_keras.AutoCheckpoint(directory, save_freq=2, max_to_keep=3, async_save=async_save)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=50)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=0, factor=0.5, min_delta=10.0)
    name, sig, n = "none", signal.SIGTERM, 0
    if window != "none":
        name, signame, num = window.split(":")
        sig, n = getattr(signal, signame), int(num)
    if name == "restore":
        signal_during_restore(sig)
        name = "sent"
    if name == "step":
        signal_in_train_step(model, sig, n)
        name = "sent"
    hist = model.fit(x[:N], y[:N], batch_size=BATCH, epochs=EPOCHS, validation_data=(x[N:], y[N:]), verbose=0,
                     callbacks=[ck, stop, plateau, Signaller(ck, name, sig, n)])
    np.savez(out + ".npz", *[np.asarray(w) for w in model.get_weights()])
    with open(out + ".json", "w") as f:
        json.dump({"epoch": hist.epoch, "history": hist.history, "best": float(stop.best),
                   "lr": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
                   "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations))}, f)
    print("AFTER FIT", flush=True)


def serve() -> None:
    """Read ``DIRECTORY OUT_PREFIX WINDOW [async]`` lines on stdin and run each in a new process forked from
    this one (Keras and torch imported, nothing built or run yet: a fresh process without the 4 s import),
    its stdout/stderr in OUT_PREFIX.stdout/.stderr; answer each line with the child's exit status."""
    for line in sys.stdin:
        argv = line.split()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            signal.alarm(120)  # a hung run ends (SIGALRM) instead of hanging the test
            try:
                for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
                    with open(argv[1] + suffix, "w") as f:
                        os.dup2(f.fileno(), fd)
                main(argv)
                code = 0
            except SystemExit as e:  # what the interpreter would exit with
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main(sys.argv[1:])

"""Child process for tests/test_lightning.py: a tiny fit with validation that signals itself at a chosen moment.

usage: lightning_windows.py CKPT_DIR LOG_FILE OUT_WEIGHTS [--at WINDOW] [--no-exit] [--early] [--every N]

The fit is identical every time (3 epochs of 6 batches, 2 validation batches, AutoCheckpoint saving every N steps,
default 4, monitor="val_loss"); ``--at`` only decides when the process sends SIGTERM to itself:
``sanity`` (first sanity-check batch), ``step:S`` (in the training step that starts at global step S),
``restore`` (while Lightning restores the checkpoint), ``save:S`` (during autockpt's save of step S),
``val:E`` (first validation batch of epoch E), ``after:S`` (a callback after AutoCheckpoint, at the end of the
batch that reached step S), ``end`` (the module's on_train_end, after the last save).
``--early``: EarlyStopping ends the run after epoch 1 of 3. ``--max-steps N``: stop at step N, not after 3
epochs. ``--usr1``: send SIGUSR1 instead. ``--no-exit``: exit_on_preemption=False (the test runs that variant
in its own process, via ``main``).
Logs "START", "STEP <global_step> <sample indices>", "VAL <epoch> <val_loss repr>", "EPOCH_END <epoch>",
"END ..." and, when ``fit`` returned, "AFTER_FIT"; writes the weights when the run was not preempted.
"""

import logging
import os
import signal
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from autockpt.integrations.lightning import AutoCheckpoint

window, arg, log_file, signum = "", "", "", signal.SIGTERM


def write(line: str) -> None:
    with open(log_file, "a") as f:
        f.write(line + "\n")


def kill_self() -> None:
    write(f"SIGNAL {window}:{arg}" if arg else f"SIGNAL {window}")
    os.kill(os.getpid(), signum)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(8, 1))
        self.val_losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        write(f"STEP {self.global_step} {','.join(str(int(i)) for i in idx)}")
        if window == "step" and self.global_step == int(arg):
            kill_self()
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        _, x, y = batch
        if batch_idx == 0 and ((window == "sanity" and self.trainer.sanity_checking)
                               or (window == "val" and not self.trainer.sanity_checking
                                   and self.current_epoch == int(arg))):
            kill_self()
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.val_losses.append(loss)
        return loss

    def on_validation_epoch_end(self):
        loss = torch.stack(self.val_losses).mean()
        self.val_losses.clear()
        self.log("val_loss", loss)
        self.log("ep", float(self.current_epoch))
        if not self.trainer.sanity_checking:
            write(f"VAL {self.current_epoch} {float(loss)!r}")

    def on_train_epoch_end(self):
        write(f"EPOCH_END {self.current_epoch}")

    def on_save_checkpoint(self, checkpoint):
        if window == "save" and self.global_step == int(arg):
            kill_self()

    def on_load_checkpoint(self, checkpoint):
        if window == "restore":
            kill_self()

    def on_train_end(self):
        if window == "end":
            kill_self()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}


class After(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if window == "after" and trainer.global_step == int(arg):
            kill_self()


def main(argv: list[str]) -> AutoCheckpoint:
    """One run; ``tests/test_lightning.py`` also calls it in its own process (with ``--no-exit``)."""
    global window, arg, log_file, signum
    ckpt_dir, log_file, out_weights = argv[:3]
    opts = argv[3:]
    at = opts[opts.index("--at") + 1] if "--at" in opts else ""
    every = int(opts[opts.index("--every") + 1]) if "--every" in opts else 4
    window, _, arg = at.partition(":")
    signum = signal.SIGUSR1 if "--usr1" in opts else signal.SIGTERM
    pl.seed_everything(7, workers=True)
    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.arange(24), torch.randn(24, 4, generator=gen), torch.randn(24, 1, generator=gen))
    val = TensorDataset(torch.arange(8), torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen))
    cb = AutoCheckpoint(ckpt_dir, every_n_train_steps=every, max_to_keep=None, monitor="val_loss",
                        exit_on_preemption="--no-exit" not in opts)
    callbacks = [cb, After()]
    if "--early" in opts:  # "ep" passes 0.5 at the end of epoch 1: should_stop, 2 epochs of 3
        callbacks.append(EarlyStopping(monitor="ep", mode="max", stopping_threshold=0.5))
    max_steps = int(opts[opts.index("--max-steps") + 1]) if "--max-steps" in opts else -1
    trainer = pl.Trainer(max_epochs=3 if max_steps == -1 else -1, max_steps=max_steps, accelerator="cpu",
                         deterministic=True, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)
    model = Net()
    write("START")
    try:
        trainer.fit(model, DataLoader(train, batch_size=4, shuffle=True), DataLoader(val, batch_size=4))
    finally:
        write(f"END restored={cb.restored_step} preempted={int(cb.preempted)} step={trainer.global_step} "
              f"exit_code={cb.exit_code}")
    write("AFTER_FIT")
    if not cb.preempted:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_weights)
    return cb


if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    main(sys.argv[1:])

"""Child process for tests/test_lightning.py: trains a tiny LightningModule with AutoCheckpoint.

usage: lightning_train.py CKPT_DIR LOG_FILE OUT_WEIGHTS PACKAGE [STRATEGY] [DELAY] [MODE]
MODE ``rankseed``: every rank seeds its own generators differently after ``seed_everything`` (as a job that does
not seed them alike), and each step also logs "LOSS <global_step> <loss as float.hex>". MODE ``rank0only``: the
same, with the callback's gathering of every rank's RNG switched off (the old behaviour: rank 0's RNG restored
into every rank).
Runs the identical ``trainer.fit(model, loader)`` every time; logs "START <restored step>" and, for every
training step, "STEP <global_step> <sample indices>" to LOG_FILE (global rank 0 only), and prints the step.
Writes the final weights (safetensors) to OUT_WEIGHTS when the run completes; a preempted run leaves with
exit code 143 (the END line is written on the way out).
"""

import os
import random
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

ckpt_dir, log_file, out_weights, package = sys.argv[1:5]
strategy = sys.argv[5] if len(sys.argv) > 5 else "auto"
delay = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
mode = sys.argv[7] if len(sys.argv) > 7 else ""

if package == "lightning":
    import lightning.pytorch as pl
else:
    import pytorch_lightning as pl  # type: ignore[no-redef]

from autockpt.integrations.lightning import AutoCheckpoint  # noqa: E402

torch.set_num_threads(1)


def rank_log(rank: int) -> str:
    return log_file if rank == 0 else f"{log_file}.rank{rank}"


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        with open(rank_log(self.global_rank), "a") as f:
            f.write(f"STEP {self.global_step} {','.join(str(int(i)) for i in idx)}\n")
        if self.trainer.is_global_zero:
            print(f"STEP {self.global_step}", flush=True)
        if delay:
            time.sleep(delay)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if mode:
            loss = loss + 1e-3 * (random.random() + float(np.random.rand()))
            with open(rank_log(self.global_rank), "a") as f:
                f.write(f"LOSS {self.global_step} {float(loss).hex()}\n")
        return loss

    def on_train_start(self) -> None:
        if mode:  # after Lightning's DDP setup, which reseeds every rank alike (the callback restores later)
            random.seed(1234 + 7 * self.global_rank)
            np.random.seed(1234 + 7 * self.global_rank)
            torch.manual_seed(1234 + 7 * self.global_rank)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}


pl.seed_everything(1234, workers=True)
n = 64
gen = torch.Generator().manual_seed(0)
data = TensorDataset(torch.arange(n), torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen))
loader = DataLoader(data, batch_size=4, shuffle=True)
model = Net()
cb = AutoCheckpoint(ckpt_dir, every_n_train_steps=5, max_to_keep=2)
if mode == "rank0only":  # the checkpoints as written before every rank's RNG was saved
    full_state = cb.state_dict
    cb.state_dict = lambda: {k: v for k, v in full_state().items() if k != "rngs"}  # type: ignore[method-assign]
trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2 if strategy == "ddp" else 1, strategy=strategy,
                     deterministic=True, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, callbacks=[cb])
with open(rank_log(int(os.environ.get("LOCAL_RANK", "0"))), "a") as f:
    f.write(f"START pid={os.getpid()}\n")
try:
    trainer.fit(model, loader)  # after a preemption it leaves the process with exit code 143 (SystemExit)
finally:
    with open(rank_log(trainer.global_rank), "a") as f:
        f.write(f"END restored={cb.restored_step} preempted={int(cb.preempted)} step={trainer.global_step} "
                f"exit_code={cb.exit_code}\n")
if trainer.is_global_zero:
    if not cb.preempted:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_weights)
print("DONE", flush=True)

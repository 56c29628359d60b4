"""Train a small LightningModule that survives kill -9 and SIGTERM: run it, interrupt it, run it again.

    PYTHONPATH=src python examples/lightning_fit.py /tmp/lightning_run
    # kill -9 it part-way, or `kill -TERM <pid>` (it saves, then leaves with exit code 143), then run the same
    # command again: it continues from the newest checkpoint, mid-epoch included, with no ckpt_path.
"""

import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from autockpt.integrations.lightning import AutoCheckpoint


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


def main(directory: str) -> None:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=32, shuffle=True)
    ckpt = AutoCheckpoint(directory, every_n_train_steps=50, max_to_keep=3, keep_every_n_hours=6,
                          monitor="train_loss", mode="min", save_top_k=1)
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", deterministic=True, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[ckpt])
    trainer.fit(Regressor(), data)  # no ckpt_path: AutoCheckpoint resumes by itself
    # a preempted run does not get here: the process left with exit code 143 (exit_on_preemption=True)
    print(f"done: step {trainer.global_step} (resumed from {ckpt.restored_step})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/autockpt_lightning_example")

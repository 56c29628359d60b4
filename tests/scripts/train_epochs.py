"""An epoch-shaped training loop under ``run.epochs()`` that signals ITSELF at a chosen moment (a "window").

Driven by tests/test_resume.py. Six batches per epoch, three epochs (18 steps), a save every 4 steps.
``--window``: where ``os.kill(os.getpid(), SIG)`` happens:
  restore     while the checkpoint is being restored at start (a state object's load_state_dict signals)
  step        in the body of step 13 (the 2nd batch of epoch 3; no save in flight)
  async       in the body of step 8, while the (async) save of step 8 is still being written (``HoldWrites``
              keeps its thread at its first fsync until the signal is sent; prints ``INFLIGHT 8 yes|no``)
  eval        inside the per-epoch evaluation of epoch 2
  last_step   in the body of the very last step
  final_save  while the final checkpoint is being written (a state object's state_dict signals)
``--sigkill-at S``: SIGKILL itself in the body of step S (a crash). Prints ``loss <step> <hex>`` per step and
``eval <epoch> <hex>`` per evaluation; writes the parameters' bytes as hex to ``--params`` once the loop ended.
"""

from __future__ import annotations

import argparse
import os
import random
import signal

import numpy as np
import torch
from hold_writes import HoldWrites

import autockpt

ap = argparse.ArgumentParser()
ap.add_argument("--params", required=True)
ap.add_argument("--window", default=None)
ap.add_argument("--signal", default="SIGTERM")
ap.add_argument("--sigkill-at", type=int, default=None)
args = ap.parse_args()
SIG = getattr(signal, args.signal)

torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
torch.set_num_threads(1)

g = torch.Generator().manual_seed(5)
x_all, y_all = torch.randn(48, 6, generator=g), torch.randn(48, 1, generator=g)
dataset = torch.utils.data.TensorDataset(x_all, y_all)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
loader = autockpt.ResumableLoader(dataset, batch_size=8, shuffle=True, seed=3)
signal_in_next_save = False
hold = HoldWrites()
if args.window == "async":
    hold.install()  # before autockpt starts its writer thread


class Probe:
    """Signals from inside a restore or a save."""

    def state_dict(self) -> dict[str, int]:
        if signal_in_next_save:
            os.kill(os.getpid(), SIG)
        return {"n": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if args.window == "restore":
            os.kill(os.getpid(), SIG)


def evaluate(epoch: int) -> None:
    global signal_in_next_save
    model.eval()
    with torch.no_grad():
        val = torch.nn.functional.mse_loss(model(x_all), y_all).item()
    model.train()
    print(f"eval {epoch} {val.hex()}", flush=True)
    if args.window == "eval" and epoch == 2:
        os.kill(os.getpid(), SIG)
    if args.window == "final_save" and epoch == 3:
        signal_in_next_save = True  # the next save is the final one


run = autockpt.resume(os.environ["CKPT"], model=model, optimizer=opt,
                      scheduler=sched, data=loader, state={"probe": Probe()}, every_n_steps=4,
                      async_save=args.window == "async")
for epoch in run.epochs(1, 4):
    for x, y in loader:
        step = run.step
        if step == args.sigkill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = x + 0.01 * torch.from_numpy(np.random.normal(size=tuple(x.shape))).float()  # numpy RNG
        opt.zero_grad()
        loss = random.uniform(0.9, 1.1) * torch.nn.functional.mse_loss(model(x), y)  # Python RNG; dropout
        loss.backward()
        opt.step()
        print(f"loss {step} {loss.item().hex()}", flush=True)
        if args.window == "async" and step == 7:  # the save of step 8 starts after this step: hold its write
            run.manager.wait_until_finished()  # (not an earlier save's)
            hold.holding = True
        if args.window == "async" and step == 8:
            print(f"INFLIGHT 8 {'no' if 8 in run.manager.all_steps() else 'yes'}", flush=True)
        if (args.window, step) in (("step", 13), ("async", 8), ("last_step", 17)):
            os.kill(os.getpid(), SIG)
            hold.release()
    evaluate(epoch)
    sched.step()

with open(args.params, "w") as f:
    f.write(torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes().hex())
print(f"done step={run.step}", flush=True)

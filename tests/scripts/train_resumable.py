"""A small real training run driven by tests/test_resume.py (CPU, deterministic).

Prints ``start <step>`` once restored, ``step <s>`` as the body for step ``s`` begins, ``exit ...`` at the end;
appends one JSON line per step (loss as float.hex, the sample indices) to ``--log``; writes the final
parameters (hex of their bytes) to ``--params`` when the loop finished. A SIGTERM/SIGINT handler installed
*before* autockpt's records where the signal arrived (and shows that earlier handlers still run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch

import autockpt

ap = argparse.ArgumentParser()
ap.add_argument("--ckpt", required=True)
ap.add_argument("--log", required=True)
ap.add_argument("--params", required=True)
ap.add_argument("--signals-log", required=True)
ap.add_argument("--total", type=int, default=60)
ap.add_argument("--every", type=int, default=5)
ap.add_argument("--workers", type=int, default=2)
ap.add_argument("--sleep", type=float, default=0.01)
ap.add_argument("--slow-from", type=int, default=None, help="steps from this one on take 0.3 s (time to signal)")
ap.add_argument("--double-term", action="store_true", help="send a 2nd SIGTERM to itself during the final save")
args = ap.parse_args()

torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(96, 6, generator=g)
        self.y = self.x @ torch.randn(6, 1, generator=g) + 0.1 * torch.randn(96, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.8)
loader = autockpt.ResumableLoader(Data(), batch_size=8, shuffle=True, seed=7, num_workers=args.workers)

in_body: int | None = None
run: autockpt.Run | None = None


def record(signum: int, frame: object) -> None:  # installed before autockpt's handler; must keep running
    with open(args.signals_log, "a") as f:
        f.write(json.dumps({"signal": signum, "in_body": in_body, "step": run.step if run else None}) + "\n")


signal.signal(signal.SIGTERM, record)


class DoubleTerm:
    """Sends itself a second SIGTERM while the final (preemption) save is running."""

    sent = False

    def state_dict(self) -> dict[str, int]:
        if args.double_term and run is not None and run._watcher.triggered and not DoubleTerm.sent:
            DoubleTerm.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # let it arrive in the middle of the save
        return {"sent": int(DoubleTerm.sent)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


with autockpt.resume(args.ckpt, model=model, optimizer=opt, scheduler=sched, data=loader,
                     state={"probe": DoubleTerm()}, every_n_steps=args.every, max_to_keep=2) as active:
    run = active
    print(f"start {run.step} restored={run.restored}", flush=True)
    batches = run.batches(loader)
    for step in run.steps(args.total):
        in_body = step
        print(f"step {step}", flush=True)
        idx, x, y = next(batches)
        x = x + 0.01 * torch.from_numpy(np.random.normal(size=tuple(x.shape))).float()  # numpy RNG
        scale = random.uniform(0.9, 1.1)  # Python RNG
        opt.zero_grad()
        loss = scale * torch.nn.functional.mse_loss(model(x), y)  # dropout: torch RNG
        loss.backward()
        opt.step()
        sched.step()
        with open(args.log, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss.item().hex(), "idx": idx.tolist()}) + "\n")
        run.log(loss=loss.item())
        time.sleep(0.3 if args.slow_from is not None and step >= args.slow_from else args.sleep)
        in_body = None

if active.finished:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    with open(args.params, "w") as f:
        f.write(flat.numpy().tobytes().hex())
print(f"exit step={active.step} preempted={active.preempted} latest={active.manager.latest_step} "
      f"code={active.exit_code}", flush=True)
sys.exit(active.exit_code)

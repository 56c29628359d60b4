"""A plain PyTorch loop with a CheckpointManager: kill it at any moment (even kill -9) and run it again.

    python examples/manager_loop.py runs/manager_demo      # Ctrl-C or kill -9 it half-way, then run it again
"""

import sys

import torch

import autockpt

directory = sys.argv[1] if len(sys.argv) > 1 else "runs/manager_demo"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2000)
# RNGState captures the global generators, so the random data stream continues exactly after a restart
state = {"model": model, "opt": opt, "sched": sched, "rng": autockpt.RNGState()}

with autockpt.CheckpointManager(directory, max_to_keep=3, save_interval_steps=100,
                                keep_best=autockpt.KeepBest("loss", mode="min")) as mgr:
    start = mgr.restore(state) or 0
    print(f"starting at step {start}" + (" (restored)" if start else " (fresh)"), flush=True)
    for step in range(start + 1, 2001):
        x = torch.randn(64, 16)
        loss = (model(x).squeeze(1) - x.sum(1).sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if mgr.save(step, state, metrics={"loss": loss.item()}):
            print(f"step {step}: loss {loss.item():.4f}, saved", flush=True)
print("done; checkpoints kept:", mgr.all_steps())

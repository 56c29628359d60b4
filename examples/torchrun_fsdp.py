"""FSDP2 (fully_shard) under torchrun, checkpointed by autockpt: kill it at any moment and run it again.

    torchrun --nproc-per-node 2 examples/torchrun_fsdp.py runs/fsdp_demo
    # SIGTERM any one rank (or the torchrun launcher) half-way: every rank saves the same step and stops.
    # Run the same command again, even with another --nproc-per-node: it resumes from that checkpoint.

On CPU it uses the gloo backend; with GPUs, NCCL (one GPU per rank). The checkpoint directory must be
shared by every rank (one machine, NFS, Lustre, ...) or be an object store URL (s3://...).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import autockpt
from autockpt.integrations.torch_distributed import any_rank
from autockpt.preemption import PreemptionWatcher

directory = sys.argv[1] if len(sys.argv) > 1 else "runs/fsdp_demo"
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device)
fully_shard(model, mesh=init_device_mesh(device.type, (world,)))  # parameters become sharded DTensors
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
state = {"model": model, "opt": opt}
gen = torch.Generator().manual_seed(1000 + rank)

with autockpt.CheckpointManager(directory, max_to_keep=3, save_interval_steps=100) as mgr, \
        PreemptionWatcher() as watcher:
    if mgr.latest_step is not None:
        # A restore reads into the optimizer's own sharded state, so it must exist: one step with zero gradients
        # creates it (the values it computes are all replaced by the checkpoint's).
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    start = mgr.restore(state) or 0  # every rank restores the same step; resharded if the world size changed
    if rank == 0:
        print(f"{world} ranks, starting at step {start}" + (" (restored)" if start else " (fresh)"), flush=True)
    for step in range(start + 1, 2001):
        x = torch.randn(64, 16, generator=gen).to(device)
        loss = (model(x).squeeze(1) - x.sum(1).sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stop = any_rank(watcher.triggered)  # a signal seen by any rank stops all of them at this step
        if mgr.save(step, state, metrics={"loss": loss.item()}, force=stop) and rank == 0:
            print(f"step {step}: loss {loss.item():.4f}, saved", flush=True)
        if stop:
            if rank == 0:
                print(f"preempted: saved step {step} and stopped", flush=True)
            break
    if rank == 0:
        print("checkpoints kept:", mgr.all_steps(), flush=True)
dist.destroy_process_group()

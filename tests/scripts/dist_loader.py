"""One rank of a gloo group for the sharding tests of ``ResumableLoader`` (tests/test_resume.py).

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python dist_loader.py OUT CKPT PHASE [K]
  first K  take K batches of epoch 0, save the loader's state (step K) with a CheckpointManager
  rest     restore it (on this world size, maybe another) and take the rest of epoch 0, then all of epoch 1
Writes OUT/result-<rank>.json: the sample ids taken, and what DistributedSampler serves this rank.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import autockpt

OUT, CKPT, PHASE = sys.argv[1], sys.argv[2], sys.argv[3]
K = int(sys.argv[4]) if len(sys.argv) > 4 else 0
N, BATCH, SEED = 96, 4, 11


def ids(batches: list) -> list[int]:
    return [int(i) for b in batches for i in b]


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = list(range(N))  # sample i is its own id
    result: dict = {"rank": rank, "world": world}
    for epoch in (0, 1):
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=True, seed=SEED)
        sampler.set_epoch(epoch)
        result[f"distributed_sampler_{epoch}"] = list(sampler)
    loader = autockpt.ResumableLoader(ds, batch_size=BATCH, shuffle=True, seed=SEED)
    result["len"] = len(loader)
    with autockpt.CheckpointManager(CKPT) as mgr:
        if PHASE == "first":
            it = iter(loader)
            result["taken"] = ids([next(it) for _ in range(K)])
            mgr.save(K, {"data": loader})
            result["state"] = loader.state_dict()
            ds51 = list(range(51))  # 51 % 2 and 51 % 4 != 0: DistributedSampler pads (or drops with drop_last)
            for drop_last in (False, True):
                ours = autockpt.ResumableLoader(ds51, batch_size=BATCH, shuffle=True, seed=SEED, drop_last=drop_last)
                sampler = torch.utils.data.DistributedSampler(ds51, shuffle=True, seed=SEED, drop_last=drop_last)
                theirs = torch.utils.data.DataLoader(ds51, batch_size=BATCH, sampler=sampler, drop_last=drop_last)
                result[f"uneven_drop_last_{drop_last}"] = [ids(list(ours)), ids(list(theirs)), len(ours), len(theirs)]
        else:
            result["restored"] = mgr.restore({"data": loader})
            result["state"] = loader.state_dict()
            result["rest_0"] = ids(list(loader))
            result["epoch_1"] = ids(list(loader))
    with open(os.path.join(OUT, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

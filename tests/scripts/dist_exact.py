"""One rank of a 2-rank DDP run for tests/test_ranks.py: dropout, per-rank shards, Adam, ``autockpt.resume``.

Usage (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
    python dist_exact.py OUT CKPT MODE [DELAY]
MODE ``per_rank``: ``autockpt.resume`` as it is (every rank's RNGs saved). MODE ``rank0``: the old behaviour,
rank 0's RNGs only (``rng=False`` and one plain ``RNGState`` in the state), restored into every rank.
Every rank seeds its own generators differently (as a job that does not seed them alike does), draws from
Python's, NumPy's and torch's generators each step (dropout, noise), and appends one JSON line per step to
OUT/steps-<rank>.jsonl: the step, the loss (float.hex) and the sample ids. A finished run writes its parameters
(float.hex) to OUT/final-<rank>.json. A preempted run ends with exit code 143 (``run.epochs``).
With AUTOCKPT_TEST_LOCAL_DIR set, CKPT is the remote tier behind that node-local directory (``local_dir``), with
the storage options in AUTOCKPT_TEST_STORAGE_OPTIONS (JSON; an S3 server's).
"""

from __future__ import annotations

import datetime
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import autockpt

OUT, CKPT, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
DELAY = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
N, BATCH, EPOCHS = 48, 4, 3  # 6 steps per epoch on each of 2 ranks


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    with open(os.path.join(OUT, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 8, generator=g), torch.randn(N, 1, generator=g)
    data = torch.utils.data.TensorDataset(torch.arange(N), x, y)
    loader = autockpt.ResumableLoader(data, batch_size=BATCH, shuffle=True, seed=3)
    random.seed(100 + rank)  # each rank its own random streams
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    tiers: dict[str, Any] = {}
    if os.environ.get("AUTOCKPT_TEST_LOCAL_DIR"):
        tiers = {"local_dir": os.environ["AUTOCKPT_TEST_LOCAL_DIR"],
                 "storage_options": json.loads(os.environ.get("AUTOCKPT_TEST_STORAGE_OPTIONS", "{}"))}
    if MODE == "per_rank":
        run = autockpt.resume(CKPT, model=model, optimizer=opt, data=loader, every_n_steps=4, **tiers)
    else:
        run = autockpt.resume(CKPT, model=model, optimizer=opt, data=loader, every_n_steps=4, rng=False,
                              state={"rng0": autockpt.RNGState()}, **tiers)
    with open(os.path.join(OUT, f"steps-{rank}.jsonl"), "a") as log:
        for _epoch in run.epochs(EPOCHS):
            for ids, x, y in loader:
                opt.zero_grad()
                noise = 1e-3 * (random.random() + float(np.random.rand()))
                loss = torch.nn.functional.mse_loss(model(x), y) + noise
                loss.backward()
                opt.step()
                log.write(json.dumps({"step": run.step, "loss": float(loss).hex(), "ids": ids.tolist()}) + "\n")
                log.flush()
                time.sleep(DELAY)
    with open(os.path.join(OUT, f"final-{rank}.json"), "w") as f:
        json.dump({n: [v.hex() for v in p.detach().flatten().tolist()] for n, p in net.named_parameters()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A toy run under ``autockpt.resume`` with a local tier and an S3 remote; driven by tests/test_tiers.py.

Usage: ``tiers_train.py REMOTE_URL LOCAL_DIR ENDPOINT STATE_MB EVERY STEPS``. The state is a tensor of
STATE_MB MiB (values ``step``) plus a small model. Prints ``step <s>`` as the body for step ``s`` begins, so a
parent can signal or kill it at a chosen moment; exits with ``run.exit_code``.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

import autockpt

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
remote, local, endpoint, mb, every, steps = sys.argv[1:7]
opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
big = torch.zeros(int(float(mb) * 2**20) // 4)
w = torch.zeros(4)
with autockpt.resume(remote, state={"big": big, "w": w}, rng=False, every_n_steps=int(every), catch_sigint=False,
                     local_dir=local, storage_options=opts, max_to_keep=3, upload_deadline_s=60) as run:
    for step in run.steps(int(steps)):
        print(f"step {step}", flush=True)
        time.sleep(0.01)
        w += 1
        big.fill_(float(step + 1))
sys.exit(run.exit_code)

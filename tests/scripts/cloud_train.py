"""A toy run under ``autockpt.resume`` that only a preemption stops; driven by tests/test_cloud_notice.py.

Prints ``step <s>`` as the body for step ``s`` begins; the state ``w`` counts completed steps, so the
checkpoint of step N holds ``w == N``. The cloud and the metadata endpoint come from the environment
(``AUTOCKPT_CLOUD``, ``AUTOCKPT_METADATA_URL``), exactly as a user would set them.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

import autockpt

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
w = np.zeros(4)
with autockpt.resume(sys.argv[1], state={"w": w}, rng=False, every_n_steps=10_000, catch_sigint=False) as run:
    for step in run.steps(10**9):
        print(f"step {step}", flush=True)
        time.sleep(0.02)
        w += 1
sys.exit(run.exit_code)

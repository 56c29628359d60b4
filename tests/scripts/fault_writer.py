"""A checkpoint writer for the fault tests (a test helper).

usage: fault_writer.py URL ENDPOINT N_SAVES FLOATS [hold]

ENDPOINT is an S3 endpoint (``http://127.0.0.1:PORT``, e.g. the fault proxy) or ``-`` for a local URL. It
continues numbering from the newest checkpoint, saves N_SAVES checkpoints with max_to_keep=2 and prints
"committed STEP" after each save returned True. With ``hold`` it then prints "holding" and keeps the writer
lease (its heartbeat running) until killed, at most 120 s.
"""

import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])  # tests/, for faultproxy.s3_options

from faultproxy import s3_options  # noqa: E402

import autockpt  # noqa: E402

url, endpoint, n_saves, floats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hold = len(sys.argv) > 5 and sys.argv[5] == "hold"
opts = None if endpoint == "-" else s3_options(endpoint)
mgr = autockpt.CheckpointManager(url, max_to_keep=2, storage_options=opts, max_consecutive_failures=1)
start = (mgr.latest_step or 0) + 1
print(f"start {start}", flush=True)
for step in range(start, start + n_saves):
    state = {"w": np.full(floats, step, np.float32), "idx": np.arange(step, step + 10), "meta": {"step": step}}
    if mgr.save(step, state):
        print(f"committed {step}", flush=True)
if hold:
    print("holding", flush=True)
    time.sleep(120)
mgr.close()

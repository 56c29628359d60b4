"""A tiered writer (local_dir + S3 through the fault proxy) for the upload-phase kill tests (a test helper).

usage: tier_kill_writer.py REMOTE_URL LOCAL_DIR ENDPOINT N_SAVES KILL_LOCAL_AT FLOATS

Restores the newest checkpoint (checking its values), prints "start STEP" (or "start None"), saves N_SAVES
steps with max_to_keep=2 and local_max_to_keep=1, printing "committed STEP" after each local save returned,
waits for the uploads, prints "durable STEP" and closes. Payload files of FLOATS float32 are uploaded in
multipart 5 MiB parts. With KILL_LOCAL_AT > 0 it SIGKILLs itself at that filesystem operation (rename, unlink,
rmdir) of the uploader thread's local pruning, counted through Python's audit hooks: KILL_LOCAL_AT=1 lands after
the remote commit and before the local copy is touched, later ones in the middle of the local delete.
"""

import os
import signal
import sys
import threading

import numpy as np

import autockpt

url, local, endpoint = sys.argv[1:4]
n_saves, kill_at, floats = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True, "default_block_size": 5 * 2**20,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": 10, "read_timeout": 10, "retries": {"max_attempts": 2}}}
events = 0


def hook(event: str, args: tuple) -> None:
    global events
    if event in ("os.rename", "os.remove", "os.rmdir") and str(args[0]).startswith(local) \
            and threading.current_thread().name == "autockpt-upload":
        events += 1
        if kill_at and events == kill_at:
            sys.stderr.write(f"killed-at {event} {args[0]}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(hook)
mgr = autockpt.CheckpointManager(url, storage_options=opts, local_dir=local, max_to_keep=2, local_max_to_keep=1)
start = mgr.latest_step
if start is not None:
    target = {"w": np.zeros(floats, np.float32), "meta": None}
    assert mgr.restore(target) == start and (target["w"] == start).all() and target["meta"] == {"step": start}
print(f"start {start}", flush=True)
for step in range((start or 0) + 1, (start or 0) + 1 + n_saves):
    mgr.save(step, {"w": np.full(floats, step, np.float32), "meta": {"step": step}})
    print(f"committed {step}", flush=True)
assert mgr.wait_until_finished(timeout=120)
print(f"durable {mgr.durable_step}", flush=True)
mgr.close()
print(f"pruning-ops {events}", flush=True)

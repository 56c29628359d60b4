"""A tiered writer to pause mid-upload (a test helper for the zombie test of tests/test_tier_faults.py).

usage: tier_zombie.py REMOTE_URL LOCAL_DIR ENDPOINT TTL

Saves step 1 (max_to_keep=2, lease_ttl=TTL), waits until it is durable, prints "ready"; on the line "go" saves
step 2 (whose upload the test pauses with SIGSTOP, through the fault proxy), prints "saved 2"; on the line
"go" (after SIGCONT) saves step 3 (its pruning deletes step 1), waits for the uploads and prints "wait RESULT",
closes and prints "closed RESULT".
"""

import sys

import numpy as np

import autockpt

url, local, endpoint, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def state(step: int) -> dict[str, object]:
    return {"w": np.full(2**18, step, np.float32), "meta": {"step": step, "writer": "zombie"}}


def outcome(fn: object) -> str:
    try:
        return repr(fn())  # type: ignore[operator]
    except Exception as e:
        return f"{type(e).__name__}: {e}"


mgr = autockpt.CheckpointManager(url, storage_options=opts, local_dir=local, max_to_keep=2, lease_ttl=ttl)
mgr.save(1, state(1))
assert mgr.wait_until_finished(timeout=60)
print("ready", flush=True)
sys.stdin.readline()
print(f"saved 2 {outcome(lambda: mgr.save(2, state(2)))}", flush=True)
sys.stdin.readline()
print(f"saved 3 {outcome(lambda: mgr.save(3, state(3)))}", flush=True)
print(f"wait {outcome(lambda: mgr.wait_until_finished(timeout=30))}", flush=True)
print(f"closed {outcome(mgr.close)}", flush=True)

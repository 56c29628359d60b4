"""A writer for the lease tests (a test helper): one process, many rounds, or a writer to pause.

usage: lease_worker.py INDEX STORAGE_OPTIONS_JSON race
    Reads lines "go URL T" from stdin: waits until time T (the same instant for every worker), then
    saves step INDEX + 1 to URL and prints "won" (the save committed) or "lease MESSAGE" (LeaseError) or
    "error REPR"; then waits for a line "end" and closes its manager (so that no loser takes over before
    every worker tried). Ends at end of input.
usage: lease_worker.py INDEX STORAGE_OPTIONS_JSON zombie URL TTL
    Saves steps 1 and 2 with max_to_keep=1 and lease_ttl=TTL, prints "ready", then waits for a line "go"
    (the test pauses it with SIGSTOP meanwhile), then saves step 3 and prints "saved" or "lease MESSAGE".
usage: lease_worker.py INDEX STORAGE_OPTIONS_JSON collector URL TTL
    A deduplicating writer (max_to_keep=1, lease_ttl=TTL) paused inside its collector: saves steps 1 and 2,
    then saves step 3 and, when the collection after it starts, prints "collecting" and stops itself (SIGSTOP);
    once continued it prints "saved" or "lease MESSAGE".
usage: lease_worker.py INDEX STORAGE_OPTIONS_JSON successor URL
    A deduplicating writer (max_to_keep=1) that saves steps 10 and 11, then writes step 12 and, right before its
    commit (packs written, manifest not yet), prints "committing" and stops itself (SIGSTOP); once continued it
    commits, prints "saved" or "error REPR", and closes.
"""

import json
import os
import signal
import sys
import time

import numpy as np

import autockpt
from autockpt.errors import LeaseError

index, opts, mode = int(sys.argv[1]), json.loads(sys.argv[2]) or None, sys.argv[3]


def state(step: int) -> dict[str, object]:
    return {"w": np.full(64, step, np.float32), "meta": {"step": step, "writer": index}}


def dedup_state(step: int) -> dict[str, object]:
    return {"frozen": np.arange(4096, dtype=np.float32), "w": np.full(64, step, np.float32),
            "meta": {"step": step, "writer": index}}


def stop_here(say: str) -> None:
    print(say, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # a real pause, at exactly this point


if mode == "race":
    for line in sys.stdin:
        if not line.startswith("go "):
            continue
        _, url, at = line.split()
        mgr = autockpt.CheckpointManager(url, storage_options=opts, max_consecutive_failures=1)
        while time.time() < float(at):
            time.sleep(0.0005)
        try:
            print("won" if mgr.save(index + 1, state(index + 1)) else "not saved", flush=True)
        except LeaseError as e:
            print(f"lease {e}", flush=True)
        except Exception as e:
            print(f"error {e!r}", flush=True)
        sys.stdin.readline()  # "end"
        mgr.close()
elif mode == "collector":
    import autockpt.manager
    from autockpt.collect import collect

    url, ttl = sys.argv[4], float(sys.argv[5])
    mgr = autockpt.CheckpointManager(url, storage_options=opts, max_to_keep=1, lease_ttl=ttl, dedup=True)
    mgr.save(1, dedup_state(1))
    mgr.save(2, dedup_state(2))

    def paused_collect(*args: object, **kwargs: object) -> int:
        stop_here("collecting")
        return collect(*args, **kwargs)  # type: ignore[arg-type]

    autockpt.manager.collect = paused_collect  # type: ignore[assignment]
    try:
        mgr.save(3, dedup_state(3))
        print("saved", flush=True)
    except LeaseError as e:
        print(f"lease {e}", flush=True)
    mgr.close()
elif mode == "successor":
    from autockpt.storage.base import CheckpointWriter

    url = sys.argv[4]
    mgr = autockpt.CheckpointManager(url, storage_options=opts, max_to_keep=1, dedup=True)
    mgr.save(10, dedup_state(10))
    mgr.save(11, dedup_state(11))
    real_commit = CheckpointWriter.commit

    def paused_commit(self: CheckpointWriter, manifest: bytes) -> None:
        stop_here("committing")
        real_commit(self, manifest)

    CheckpointWriter.commit = paused_commit  # type: ignore[method-assign]
    try:
        print("saved" if mgr.save(12, {**dedup_state(12), "new": np.full(512, 12, np.float32)}) else "not saved",
              flush=True)
    except Exception as e:
        print(f"error {e!r}", flush=True)
    mgr.close()
else:
    url, ttl = sys.argv[4], float(sys.argv[5])
    mgr = autockpt.CheckpointManager(url, storage_options=opts, max_to_keep=1, lease_ttl=ttl)
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    print("ready", flush=True)
    sys.stdin.readline()  # "go", after SIGSTOP ... SIGCONT
    try:
        mgr.save(3, state(3))
        print("saved", flush=True)
    except LeaseError as e:
        print(f"lease {e}", flush=True)
    mgr.close()

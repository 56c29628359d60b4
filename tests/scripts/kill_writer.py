"""A checkpoint writer that SIGKILLs itself at its N-th filesystem operation (a test helper).

usage: kill_writer.py URL N_SAVES KILL_AT [PAYLOAD_FLOATS]

It restores nothing; it continues numbering from the newest checkpoint, saves N_SAVES checkpoints with
max_to_keep=2 and prints "committed STEP" after each save returned. With KILL_AT > 0 it kills itself with
a real SIGKILL at that filesystem operation (open, mkdir, rename, remove, rmdir, listdir, fsync: counted
through Python's audit hooks), so kills land in the payload write, the manifest, the commit and the pruning.
"""

import os
import signal
import sys

import numpy as np

import autockpt

url, n_saves, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
floats = int(sys.argv[4]) if len(sys.argv) > 4 else 20_000
COUNTED = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.listdir", "os.scandir", "os.fsync"}
armed = False
events = 0
TRACE = os.environ.get("AUTOCKPT_TRACE") == "1"


def hook(event: str, args: tuple) -> None:
    global events
    if armed and event in COUNTED:
        events += 1
        if TRACE:  # for the fault harness: which operation is which
            sys.stderr.write(f"event {events} {event} {args[0] if args else ''}\n")
        if events == kill_at:
            sys.stderr.write(f"killed-at {event} {args[0] if args else ''}\n")  # for the fault figures
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(hook)
_fsync = os.fsync


def fsync(fd: int) -> None:
    hook("os.fsync", ())
    _fsync(fd)


os.fsync = fsync

mgr = autockpt.CheckpointManager(url, max_to_keep=2)
start = (mgr.latest_step or 0) + 1
armed = True
for step in range(start, start + n_saves):
    state = {"w": np.full(floats, step, np.float32), "idx": np.arange(step, step + 10), "meta": {"step": step}}
    mgr.save(step, state)
    print(f"committed {step}", flush=True)
print(f"events {events}", flush=True)

"""Save time of a sharded state with 1, 2 and 4 gloo processes on the CPU (one launch per world size).

    PYTHONPATH=src python benchmarks/distributed_save.py --mib 256 --worlds 1 2 4 --repeat 3 --dir /tmp/bench

The state is one set of float32 DTensors sharded on dim 0 over all ranks (``--mib`` in total, whatever the
world size), so with N ranks each rank writes 1/N of the bytes into its own file, in parallel; rank 0 then
commits. Reported: the median wall time of ``mgr.save()`` over ``--repeat`` saves (rank 0's clock, after a
barrier), and the same bytes saved by one process without a process group, for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import autockpt

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    n_tensors = 8
    rows = args.mib * 2**20 // 4 // 1024 // n_tensors
    if world > 0 and "MASTER_PORT" in os.environ:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        state = {f"w{i}": distribute_tensor(torch.randn(rows, 1024), mesh, [Shard(0)]) for i in range(n_tensors)}
    else:
        state = {f"w{i}": torch.randn(rows, 1024) for i in range(n_tensors)}
    times = []
    with autockpt.CheckpointManager(args.dir, max_to_keep=1) as mgr:
        for step in range(1, args.repeat + 1):
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
            mgr.save(step, state, force=True)
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"times": times}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(n: int, args: argparse.Namespace, group: bool) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.rmtree(args.dir, ignore_errors=True)
    procs = []
    for rank in range(n):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if group:
            env.update(RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--mib", str(args.mib), "--repeat",
                                       str(args.repeat), "--dir", args.dir], env=env, stdout=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    shutil.rmtree(args.dir, ignore_errors=True)
    return list(json.loads(outs[0].strip().splitlines()[-1])["times"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "autockpt-dist-bench"))
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"cores: {os.cpu_count()}, state: {args.mib} MiB of float32, {args.repeat} saves each")
    rows = [("no process group", launch(1, args, group=False))]
    rows += [(f"{n} process{'es' if n > 1 else ''}", launch(n, args, group=True)) for n in args.worlds]
    for label, times in rows:
        print(f"{label:>18}: median {statistics.median(times):.2f} s  (all: {', '.join(f'{t:.2f}' for t in times)}) "
              f"= {args.mib / statistics.median(times):.0f} MiB/s")


if __name__ == "__main__":
    main()

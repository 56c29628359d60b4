"""Sync save of many small tensors against a raw write+fsync of the same bytes: wall and CPU time, medians.

    PYTHONPATH=src python benchmarks/small_tensors.py --tensors 20000 --mib 256 --rounds 3
    PYTHONPATH=src python benchmarks/small_tensors.py --tensors 64 --mib 1024 --rounds 3 --profile

Rounds alternate the contenders (raw, autockpt dedup=True, autockpt dedup=False), each save into a fresh
directory (a first save: every tensor is written). CPU time (user + system of this process) is less disturbed
by other jobs on a shared machine than wall time: read both ratios. ``--profile`` prints a cProfile (CPU time)
of one more save, sorted by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import autockpt

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=20_000)
    ap.add_argument("--mib", type=float, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    numel = int(args.mib * 2**20 / 4 / args.tensors)
    state = {f"t{i}": torch.randn(numel) for i in range(args.tensors)}
    work = Path(tempfile.mkdtemp(prefix="autockpt-small-", dir=str(HERE)))

    def raw() -> None:
        with open(work / "raw.bin", "wb") as f:
            for v in state.values():
                f.write(memoryview(v.numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.remove(work / "raw.bin")

    def ours(dedup: bool) -> None:
        d = work / "ours"
        with autockpt.CheckpointManager(d, max_to_keep=1, dedup=dedup) as mgr:
            mgr.save(1, state)
        shutil.rmtree(d)

    contenders = {"raw write+fsync": raw, "autockpt dedup=True": lambda: ours(True),
                  "autockpt dedup=False": lambda: ours(False)}
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    try:
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                c, t = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        w = {k: statistics.median(v) for k, v in wall.items()}
        c = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"{args.tensors} tensors, {args.mib:g} MiB, {args.rounds} rounds; load {os.getloadavg()[0]:.1f}")
        print("| contender | wall (s) | ratio | CPU (s) | ratio |\n|---|---|---|---|---|")
        for k in contenders:
            print(f"| {k} | {w[k]:.3f} | {w[k] / w['raw write+fsync']:.2f} | {c[k]:.3f} | "
                  f"{c[k] / c['raw write+fsync']:.2f} |")
        if args.profile:
            prof = cProfile.Profile(time.process_time)
            prof.runcall(ours, True)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

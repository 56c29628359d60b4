"""What deduplication saves and what it costs, as ratios measured in one run (local disk, fsync included).

    PYTHONPATH=src python benchmarks/dedup.py [--mb 256] [--saves 5]

Reported (the fastest of the runs, medians beside; self-contained = ``dedup=False``):
- LoRA-style state (>= 95 % of the bytes frozen: a backbone that never changes, small trainable tensors and their
  Adam moments that change every save): bytes written per save and save time, deduplicated / self-contained
  (after the first save, which writes everything either way).
- Dense training (every tensor changes every save): save time, ``dedup=True`` / ``dedup=False`` (what the
  per-tensor content hashes cost when nothing repeats).
- CPU time per save (process time of all threads, kernel included) beside wall time: on a loaded machine it is
  the figure least disturbed by other processes.
- LoRA-style with ``async_save=True``: the time ``save()`` blocks the training (the snapshot), deduplicated /
  self-contained. Deduplicated, the unchanged host tensors are hashed instead of copied to staging buffers.
- Restore of the newest checkpoint into the live objects: deduplicated / self-contained (both verify every byte).
- Through the remote tier (``local_dir``; the remote is ``memory://``, bytes do not depend on the transport): bytes
  uploaded per LoRA save, deduplicated / self-contained (the remote's new packs and payload files per save).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import autockpt  # noqa: E402
from autockpt.reader import read_manifest  # noqa: E402
from autockpt.storage import open_storage  # noqa: E402


def make_state(total_mb: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(frozen, trainable): ~97 % of the bytes frozen; trainable tensors come with two Adam-like moments."""
    g = torch.Generator().manual_seed(0)
    frozen = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(total_mb // 4)}
    trainable = {}
    for i in range(max(1, total_mb // 64)):
        for kind in ("lora_a", "exp_avg", "exp_avg_sq"):
            trainable[f"adapter{i}.{kind}"] = torch.randn(64, 1024, generator=g)
    return frozen, trainable


def written_bytes(url: str, step: int) -> int:
    """Bytes the save of ``step`` wrote: its own payload files, and the packs it wrote."""
    m = read_manifest(open_storage(url), step)
    own = sum(f["size"] for f in m["files"].values())
    return own + sum(b["size"] for n, b in m.get("blobs", {}).items() if n.startswith(f"step_{step:010d}-"))


def run_saves(url: str, dedup: bool, frozen: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor],
              saves: int, dense: bool, async_save: bool = False) -> tuple[list[float], list[int], list[float]]:
    """Per save after the first: the time save() blocked (with ``async_save``: the snapshot), the bytes written
    and the CPU time until the save finished."""
    times, sizes, cpu = [], [], []
    with autockpt.CheckpointManager(url, max_to_keep=2, dedup=dedup, async_save=async_save) as mgr:
        for step in range(1, saves + 2):
            for t in trainable.values():
                t.add_(1e-3)
            if dense:
                for t in frozen.values():
                    t.add_(1e-3)
            t0, c0 = time.perf_counter(), time.process_time()
            mgr.save(step, {"frozen": frozen, "trainable": trainable})
            t1 = time.perf_counter()
            mgr.wait_until_finished()
            if step > 1:  # the first save writes everything either way
                times.append(t1 - t0)
                cpu.append(time.process_time() - c0)
                sizes.append(written_bytes(url, step))
    return times, sizes, cpu


def restore_time(url: str, frozen: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor], n: int) -> float:
    """The fastest of ``n`` restores."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        autockpt.CheckpointManager(url).restore({"frozen": frozen, "trainable": trainable})
        times.append(time.perf_counter() - t0)
    return min(times)


def uploaded_per_save(local: Path, dedup: bool, frozen: dict[str, torch.Tensor],
                      trainable: dict[str, torch.Tensor], saves: int) -> list[int]:
    """Bytes that reached the remote tier per save after the first (new packs, and the step's payload files)."""
    url = f"memory://bench-dedup-tiers-{dedup}-{time.monotonic_ns()}"
    remote = open_storage(url)
    seen: set[str] = set()
    out = []
    with autockpt.CheckpointManager(url, local_dir=local, max_to_keep=2, local_max_to_keep=1, dedup=dedup) as mgr:
        for step in range(1, saves + 2):
            for t in trainable.values():
                t.add_(1e-3)
            mgr.save(step, {**frozen, **trainable})
            assert mgr.wait_until_finished(timeout=600)
            m = read_manifest(remote, step)
            packs = {n: b["size"] for n, b in m.get("blobs", {}).items()}
            sent = sum(f["size"] for f in m["files"].values()) + sum(v for n, v in packs.items() if n not in seen)
            seen |= set(packs)
            if step > 1:
                out.append(sent)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="state size in MiB")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each measurement")
    args = ap.parse_args()
    frozen, trainable = make_state(args.mb)
    fbytes = sum(t.nbytes for t in frozen.values())
    tbytes = sum(t.nbytes for t in trainable.values())
    print(f"state: {(fbytes + tbytes) / 2**20:.0f} MiB, {fbytes / (fbytes + tbytes):.1%} frozen; "
          f"{args.saves} saves per run, {args.rounds} alternating rounds; torch threads {torch.get_num_threads()}")
    base = Path(tempfile.mkdtemp(prefix="autockpt-bench-dedup-"))
    try:
        res: dict[tuple[str, bool], tuple[list[float], list[int]]] = {}
        cpus: dict[tuple[str, bool], list[float]] = {}
        for kind in ("lora", "dense", "lora-async"):
            for r in range(args.rounds):
                for dedup in ((True, False) if r % 2 == 0 else (False, True)):
                    url = str(base / f"{kind}-{dedup}-{r}")
                    t, s, c = run_saves(url, dedup, frozen, trainable, args.saves, dense=kind == "dense",
                                        async_save=kind == "lora-async")
                    cpus[(kind, dedup)] = cpus.get((kind, dedup), []) + c
                    old = res.get((kind, dedup), ([], []))
                    res[(kind, dedup)] = (old[0] + t, old[1] + s)
                    if not (kind == "lora" and r == args.rounds - 1):  # the last LoRA runs are restored below
                        shutil.rmtree(url)
        # the minimum is the estimate least disturbed by other load on the machine; the median is shown beside it
        med = {k: (min(v[0]), statistics.median(v[1])) for k, v in res.items()}
        mid = {k: statistics.median(v[0]) for k, v in res.items()}
        lt, ls = med[("lora", True)]
        ft, fs = med[("lora", False)]
        print(f"LoRA-style, per save: self-contained {fs / 2**20:.1f} MiB in {ft * 1e3:.0f} ms; "
              f"deduplicated {ls / 2**20:.2f} MiB in {lt * 1e3:.0f} ms")
        print(f"  bytes written ratio {ls / fs:.3f} (target <= 0.06); save time ratio {lt / ft:.3f} (target <= 0.15; "
              f"medians: {mid[('lora', True)] / mid[('lora', False)]:.3f})")
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        print(f"  CPU time per save (all threads; not disturbed by waiting for a core): ratio "
              f"{cpu[('lora', True)] / cpu[('lora', False)]:.3f}")
        dt, _ = med[("dense", True)]
        st, _ = med[("dense", False)]
        print(f"dense, per save: dedup=False {st * 1e3:.0f} ms, dedup=True {dt * 1e3:.0f} ms; "
              f"ratio {dt / st:.3f} (target <= 1.03; medians: {mid[('dense', True)] / mid[('dense', False)]:.3f}); "
              f"CPU time ratio {cpu[('dense', True)] / cpu[('dense', False)]:.3f}")
        at, _ = med[("lora-async", True)]
        st, _ = med[("lora-async", False)]
        print(f"LoRA-style, async_save=True, time save() blocks (the snapshot): self-contained {st * 1e3:.0f} ms, "
              f"deduplicated {at * 1e3:.0f} ms; ratio {at / st:.3f} (medians: "
              f"{mid[('lora-async', True)] / mid[('lora-async', False)]:.3f})")
        last = args.rounds - 1
        dd, sc = str(base / f"lora-True-{last}"), str(base / f"lora-False-{last}")
        rd, rs = [], []
        for r in range(args.rounds):
            pair = (dd, sc) if r % 2 == 0 else (sc, dd)
            for url in pair:
                (rd if url == dd else rs).append(restore_time(url, frozen, trainable, 3))
        print(f"restore: self-contained {min(rs) * 1e3:.0f} ms, deduplicated {min(rd) * 1e3:.0f} ms; ratio "
              f"{min(rd) / min(rs):.3f} (target <= 1.05; medians: {statistics.median(rd) / statistics.median(rs):.3f})")
        up = {d: uploaded_per_save(base / f"tiers-{d}", d, frozen, trainable, args.saves) for d in (True, False)}
        print(f"through the remote tier, bytes uploaded per LoRA save: self-contained "
              f"{statistics.median(up[False]) / 2**20:.1f} MiB, deduplicated {statistics.median(up[True]) / 2**20:.2f}"
              f" MiB; ratio {statistics.median(up[True]) / statistics.median(up[False]):.3f} (target <= 0.06)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

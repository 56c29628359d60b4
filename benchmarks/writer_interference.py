"""What a background write costs the training beside it: ways of writing ~600 MB from host staging buffers,
each timed as extra wall time of a training loop (the end-to-end benchmark's 4 x Linear(3584) + Adam).

    PYTHONPATH=src python benchmarks/writer_interference.py --rounds 3

Every contender runs the same training steps with one write started every ``--every`` steps; its cost is the
loop's wall time minus the loop's wall time with no write, measured alternately in the same run (medians of
``--rounds``). Contenders (all write the same bytes, checksum them with xxh3-64, fsync, and delete the file):

- ``thread nice19``: a thread at nice 19 writes through the page cache (what ``async_save=True`` does);
- ``thread nice0``: the same at the training's priority;
- ``thread fadvise``: nice 19, and the written pages dropped from the page cache after the fsync;
- ``thread O_DIRECT``: nice 19, page-aligned buffers written with ``O_DIRECT`` (no copy into the page cache);
- ``process``: a separate process (no GIL shared) writes from shared memory through the page cache;
- ``sync``: the training waits for the write (a synchronous save's cost, for reference).
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xxhash

CHUNK = 64 * 2**20


def write_file(path: str, bufs: list[memoryview], nice: int | None, direct: bool, fadvise: bool) -> None:
    if nice is not None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    h = xxhash.xxh3_64()
    try:
        for b in bufs:
            for i in range(0, len(b), CHUNK):
                chunk = b[i:i + CHUNK]
                done = 0
                while done < len(chunk):
                    done += os.write(fd, chunk[done:])
                h.update(chunk)
        os.fsync(fd)
        if fadvise:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        os.unlink(path)


def aligned(nbytes: int) -> memoryview:
    """Page-aligned anonymous memory (an O_DIRECT write needs aligned address, length and offset)."""
    n = -(-nbytes // 4096) * 4096
    return memoryview(mmap.mmap(-1, n))


def child(path: str, shm_names: list[tuple[str, int]], go: mp.Queue, done: mp.Queue) -> None:
    from multiprocessing import shared_memory
    shms = [shared_memory.SharedMemory(name=n) for n, _ in shm_names]
    bufs = [memoryview(s.buf)[:size] for s, (_, size) in zip(shms, shm_names, strict=True)]
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    while go.get():
        write_file(path, bufs, None, False, False)
        done.put(True)
    del bufs
    for s in shms:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--width", type=int, default=3584)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(args.width, args.width),
                                                                  torch.nn.ReLU())])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(64, args.width)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    tensors = [t for t in model.state_dict().values()] + [
        v for s in opt.state_dict()["state"].values() for v in s.values() if v.dim()]
    sizes = [t.numel() * t.element_size() for t in tensors]
    total = sum(sizes)
    work = Path(tempfile.mkdtemp(prefix="autockpt-writer-", dir=str(Path(__file__).parent)))
    target = str(work / "f")
    plain = [memoryview(t.detach().clone().numpy()).cast("B") for t in tensors]
    direct = []
    for t, n in zip(tensors, sizes, strict=True):
        m = aligned(n)
        np.frombuffer(m, dtype=np.uint8, count=n)[:] = t.detach().numpy().view(np.uint8).reshape(-1)
        direct.append(m)  # whole pages: the last one padded (a real writer truncates the file after)
    from multiprocessing import shared_memory
    shms = [shared_memory.SharedMemory(create=True, size=n) for n in sizes]
    for s, b in zip(shms, plain, strict=True):
        s.buf[:len(b)] = b
    ctx = mp.get_context("spawn")
    go: mp.Queue = ctx.Queue()
    done: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(target, [(s.name, n) for s, n in zip(shms, sizes, strict=True)], go,
                                           done), daemon=True)
    proc.start()

    def loop(start: Callable[[], Callable[[], None]] | None) -> float:
        waits: list[Callable[[], None]] = []
        t = time.perf_counter()
        for s in range(1, args.steps + 1):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if start is not None and s % args.every == 0:
                if waits:
                    waits.pop()()
                waits.append(start())
        for w in waits:
            w()
        return time.perf_counter() - t

    def in_thread(bufs: list[memoryview], nice: int | None, direct_io: bool, fadvise: bool
                  ) -> Callable[[], Callable[[], None]]:
        def start() -> Callable[[], None]:
            th = threading.Thread(target=write_file, args=(target, bufs, nice, direct_io, fadvise))
            th.start()
            return th.join
        return start

    def in_process() -> Callable[[], None]:
        go.put(True)
        return lambda: done.get()

    def synchronous() -> Callable[[], None]:
        write_file(target, plain, None, False, False)
        return lambda: None

    contenders: dict[str, Callable[[], Callable[[], None]] | None] = {
        "no write": None,
        "thread nice19": in_thread(plain, 19, False, False),
        "thread nice0": in_thread(plain, 0, False, False),
        "thread fadvise": in_thread(plain, 19, False, True),
        "thread O_DIRECT": in_thread([memoryview(m) for m in direct], 19, True, False),
        "process": in_process,
        "sync": synchronous,
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, start in contenders.items():
            times[name].append(loop(start))
    go.put(False)
    proc.join(30)
    for s in shms:
        s.close()
        s.unlink()
    base = statistics.median(times["no write"])
    writes = args.steps // args.every
    print(f"{total / 2**20:.0f} MiB written every {args.every} steps ({writes} writes in {args.steps} steps), "
          f"{args.rounds} rounds, load {os.getloadavg()[0]:.1f}")
    print("| contender | loop (s) | overhead | per write (s) |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {100 * (med / base - 1):+.1f} % | {(med - base) / writes:.3f} |")
    os.rmdir(work)


if __name__ == "__main__":
    main()

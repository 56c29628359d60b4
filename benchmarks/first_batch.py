"""Time to the first batch after resuming at the start vs. at the end of a 10,000-batch epoch.

    KERAS_BACKEND=torch PYTHONPATH=src python benchmarks/first_batch.py [--workers 2] [--batches 10000]

``autockpt.ResumableLoader`` starts its sampler at the saved offset, so the batches before it are never
loaded: the time should not depend on the position. For comparison, it also times the usual workaround
with a plain DataLoader (iterate and drop the batches already seen), on a smaller skip to keep it short.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import autockpt


class Samples(torch.utils.data.Dataset):
    """A map-style dataset whose items cost a little to make, like decoding a small record."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((64,), float(i)).sin()


def first_batch_seconds(ds: Samples, batch: int, workers: int, position: int) -> float:
    loader = autockpt.ResumableLoader(ds, batch_size=batch, shuffle=True, seed=0, num_workers=workers)
    loader.load_state_dict({"epoch": 0, "batches": position})
    t0 = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--naive-skip", type=int, default=1_000, help="batches the plain-DataLoader baseline skips")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = Samples(a.batches * a.batch_size)
    rows = {}
    for pos in (0, a.batches - 1):
        first_batch_seconds(ds, a.batch_size, a.workers, pos)  # warm-up
        rows[pos] = statistics.median(
            first_batch_seconds(ds, a.batch_size, a.workers, pos) for _ in range(a.repeat)
        )
        print(f"ResumableLoader, resume at batch {pos:>6} of {a.batches}: first batch after "
              f"{rows[pos] * 1e3:8.2f} ms (median of {a.repeat}, num_workers={a.workers})")
    ratio = rows[a.batches - 1] / rows[0]
    print(f"ratio end/start: {ratio:.2f}")
    plain = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers)
    t0 = time.perf_counter()
    next(itertools.islice(iter(plain), a.naive_skip, None))
    naive = time.perf_counter() - t0
    print(f"plain DataLoader, skipping {a.naive_skip} batches by iterating: {naive * 1e3:8.2f} ms "
          f"(~{naive / a.naive_skip * a.batches:.1f} s for a whole {a.batches}-batch epoch)")


if __name__ == "__main__":
    main()

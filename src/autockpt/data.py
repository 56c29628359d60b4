"""The data position: where in which epoch a training loop is, saved and restored exactly.

Two pieces, for plain ``torch.utils.data.DataLoader`` users:

- :class:`ResumableSampler` orders the samples of each epoch (a permutation seeded with ``seed + epoch``) and
  starts its iteration at a saved offset, so the batches before it are never loaded.
- :class:`ResumableLoader` is a ``DataLoader`` over such a sampler that counts the batches the *training
  loop* received. A ``DataLoader`` pulls indices from its sampler ahead of use (prefetching, workers), so the
  sampler alone cannot know what was consumed; the loader can. Its ``state_dict()`` is ``{epoch, batches}``.

Anything else with ``state_dict()``/``load_state_dict()`` that describes a data position (torchdata's
``StatefulDataLoader``, for instance) works too: ``autockpt.resume(..., data=loader)`` accepts it.

torch is imported only when these are used, never by ``import autockpt``.

One job: the data position of a plain DataLoader. Imports only ``autockpt.errors``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Sized
from typing import Any

from autockpt.errors import InvalidArgumentError, StateMismatchError


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _load_ints(state: Any, keys: tuple[str, ...], what: str) -> dict[str, int]:
    if not isinstance(state, dict) or any(
        k not in state or isinstance(state[k], bool) or not isinstance(state[k], int) or state[k] < 0 for k in keys
    ):
        raise StateMismatchError(f"{what} state must be a dict with int entries {list(keys)} >= 0, got {state!r}")
    return {k: int(state[k]) for k in keys}


class ResumableSampler:
    """A sampler with a position: each epoch is a permutation seeded with ``seed + epoch`` (or ``range(n)``
    without shuffling), and iteration starts at ``position`` within ``epoch``.

    It counts the indices it hands out and moves to the next epoch once its iteration is used up. That count
    equals what the training loop consumed only when the ``DataLoader`` does not prefetch (``num_workers=0``);
    use :class:`ResumableLoader`, which counts consumed batches, with workers.

    ```python
    import torch, autockpt
    ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    sampler = autockpt.ResumableSampler(ds, shuffle=True, seed=0)
    first = list(sampler)                       # epoch 0
    sampler.load_state_dict({"epoch": 0, "position": 4})
    assert list(sampler) == first[4:]           # resumes mid-epoch; samples 0..3 are not touched
    ```
    """

    def __init__(self, data_source: Sized | int, shuffle: bool = True, seed: int = 0) -> None:
        if isinstance(data_source, bool):
            raise InvalidArgumentError(f"data_source must be a dataset with len() or an int, got {data_source!r}")
        if isinstance(data_source, int):
            self.num_samples = _int_arg("data_source", data_source, 0)
        elif hasattr(data_source, "__len__"):
            self.num_samples = len(data_source)
        else:
            raise InvalidArgumentError(
                f"data_source must be a dataset with len() or the number of samples, got {type(data_source).__name__}"
            )
        if not isinstance(shuffle, bool):
            raise InvalidArgumentError(f"shuffle must be True or False, got {shuffle!r}")
        self.shuffle = shuffle
        self.seed = _int_arg("seed", seed, 0)
        self.epoch = 0
        self.position = 0

    def order(self, epoch: int) -> list[int]:
        """The sample indices of ``epoch``, in the order they are served."""
        if not self.shuffle:
            return list(range(self.num_samples))
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.num_samples > 0:  # the previous epoch was used up: start the next one
            self.epoch, self.position = self.epoch + 1, 0
        epoch, order = self.epoch, self.order(self.epoch)
        for i in range(self.position, self.num_samples):
            self.position = i + 1
            yield order[i]
        if self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def set_position(self, epoch: int, position: int) -> None:
        """Make the next iteration start at sample ``position`` of ``epoch``."""
        self.epoch = _int_arg("epoch", epoch, 0)
        self.position = _int_arg("position", position, 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = _load_ints(state, ("epoch", "position"), "ResumableSampler")
        self.set_position(s["epoch"], s["position"])


# DataLoader arguments ResumableLoader cannot take, and what to use instead.
_REFUSED = {
    "sampler": "shuffle= and seed= (ResumableLoader orders the samples itself, so that it can resume the order)",
    "batch_sampler": "batch_size=, shuffle= and drop_last=",
    "generator": "seed= (epoch e is shuffled with seed + e, on every rank)",
}


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class _IndexSampler:
    """Serves a list of indices that its loader sets before each iteration."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableLoader:
    """A drop-in for ``torch.utils.data.DataLoader`` whose position in the epoch is saved and restored exactly.

    Iterating it runs one epoch from the current position (like iterating a ``DataLoader``); the next
    iteration runs the next epoch. The position counts batches handed to the training loop, so prefetching
    and worker processes do not move it. On resume the first batch not yet consumed comes first: the skipped
    batches are never loaded, so the first batch comes as fast at the end of an epoch as at the start. Epoch
    ``e`` is shuffled with ``seed + e``; worker seeds come from a generator seeded the same way, so iterating
    never draws from torch's global RNG (which would break exact resume).

    Under an initialised ``torch.distributed`` process group it shards like ``DistributedSampler`` (rank and
    world size from the group; the same ``seed + epoch`` permutation on every rank; without ``drop_last`` the
    epoch is padded with its first samples to a multiple of the world size, with ``drop_last`` the tail is
    dropped) and each rank gets every world-size-th sample. Its state then also holds ``samples``, the number
    of samples of the epoch consumed by all ranks together; rank 0's copy is enough to resume every rank, on
    the same or another world size: the rest of the epoch is sharded over the new ranks, so no sample of the
    epoch is repeated or skipped (apart from ``DistributedSampler``'s padding).

    Args:
        dataset: a map-style dataset (with ``len()``); ``loader.dataset``.
        batch_size, shuffle, drop_last: as for ``DataLoader`` (``shuffle=False``: in order, still resumable).
        seed: the base seed of the shuffle.
        **dataloader_options: ``num_workers``, ``collate_fn``, ``pin_memory``, ``worker_init_fn``,
            ``prefetch_factor``, ``timeout``, ... as for ``DataLoader``. A ``sampler``, ``batch_sampler`` or
            ``generator`` other than None (their default), and ``persistent_workers=True``, raise
            ``InvalidArgumentError`` naming what to use.

    ```python
    import torch, autockpt
    ds = torch.utils.data.TensorDataset(torch.arange(100.0))
    loader = autockpt.ResumableLoader(ds, batch_size=10, shuffle=True, seed=0)
    it = iter(loader); a = next(it); b = next(it)
    saved = loader.state_dict()                 # {'epoch': 0, 'batches': 2}
    other = autockpt.ResumableLoader(ds, batch_size=10, shuffle=True, seed=0)
    other.load_state_dict(saved)
    assert torch.equal(next(iter(other))[0], next(it)[0]) and len(other) == 10 and other.dataset is ds
    ```
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        **dataloader_options: Any,
    ) -> None:
        import torch

        for name, use in _REFUSED.items():  # None is DataLoader's default: a script passing it loses nothing
            if dataloader_options.pop(name, None) is not None:
                raise InvalidArgumentError(f"ResumableLoader does not take {name}=; use {use}")
        if dataloader_options.get("persistent_workers"):
            raise InvalidArgumentError(
                "ResumableLoader does not take persistent_workers=True: persistent workers keep the random "
                "state of the epoch they started in, so a resumed run would draw differently; use num_workers= "
                "alone (workers restart each epoch, seeded from seed + epoch)"
            )
        known = set(inspect.signature(torch.utils.data.DataLoader.__init__).parameters) - {"self", "dataset"}
        unknown = sorted(set(dataloader_options) - known)
        if unknown:
            raise InvalidArgumentError(f"ResumableLoader got unknown DataLoader arguments {unknown}")
        if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
            raise InvalidArgumentError(
                f"ResumableLoader needs a map-style dataset (with len() and [i]), got {type(dataset).__name__}; "
                "an IterableDataset has no index to resume at: use a loader with state_dict() such as "
                "torchdata's StatefulDataLoader"
            )
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(f"{name} must be True or False, got {flag!r}")
        self.dataset = dataset
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = _int_arg("seed", seed, 0)
        self.sampler = _IndexSampler()
        self._generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
            generator=self._generator, **dataloader_options,
        )
        self.epoch = 0
        self.batches = 0  # batches handed to the loop since `_start`
        self._start = 0  # samples of the epoch all ranks consumed before this stretch (a resume on another size)
        self._run: Any = None  # the Run of `run.epochs()`, which counts a step per batch and moves the epochs
        self._pending = False  # a batch was handed out and its step is not yet counted

    def __getattr__(self, name: str) -> Any:  # num_workers, collate_fn, pin_memory, ... of the DataLoader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def order(self, epoch: int) -> list[int]:
        """All sample indices of ``epoch`` in the order they are served (before sharding over ranks)."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _per_rank(self, start: int, world: int) -> int:
        """Samples each rank gets of the epoch from global sample ``start`` on (padded or dropped as
        ``DistributedSampler`` does)."""
        rest = max(len(self.dataset) - start, 0)
        return rest // world if self.drop_last else -(-rest // world)

    def _batches_of(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _indices(self, epoch: int, start: int, rank: int, world: int) -> list[int]:
        order = self.order(epoch)
        rest = order[start:]
        total = self._per_rank(start, world) * world
        if total > len(rest):  # pad with the epoch's first samples, as DistributedSampler does
            rest += (order * -(-(total - len(rest)) // max(len(order), 1)))[: total - len(rest)]
        return rest[:total][rank::world]

    def __len__(self) -> int:
        """Batches in a whole epoch (on this rank)."""
        return self._batches_of(self._per_rank(0, _rank_world()[1]))

    def _consumed(self, world: int) -> int:
        """Samples of the epoch consumed by all ranks together."""
        per_rank = self._per_rank(self._start, world)
        return min(self._start + min(self.batches * self.batch_size, per_rank) * world, len(self.dataset))

    def _next_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches, self._start = epoch, 0, 0

    def __iter__(self) -> Iterator[Any]:
        rank, world = _rank_world()
        run = self._run
        if run is None and self.batches >= self._batches_of(self._per_rank(self._start, world)):
            self._next_epoch(self.epoch + 1)  # the saved position is the end of an epoch
        epoch = self.epoch
        self.sampler.indices = self._indices(epoch, self._start, rank, world)[self.batches * self.batch_size:]
        self._generator.manual_seed(self.seed + epoch + (rank << 32))
        last = self._batches_of(self._per_rank(self._start, world))
        it = iter(self.loader)
        while True:
            if self._pending:  # the loop asks for the next batch: the step of the previous one is complete
                self._pending = False
                if run is not None:
                    run._complete_step(deferred=self.batches >= last)
            if run is not None and run.stopped:  # run.stop() ended training
                break
            try:
                batch = next(it)
            except StopIteration:
                break
            self.batches += 1  # the loop has it now
            self._pending = run is not None
            yield batch
        if run is None and self.epoch == epoch:
            self._next_epoch(epoch + 1)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``; under a process group (or after a resume on another world size) also
        ``samples``, the samples of the epoch consumed by all ranks, from which any world size resumes."""
        state = {"epoch": self.epoch, "batches": self.batches}
        world = _rank_world()[1]
        if world > 1 or self._start:
            state["samples"] = self._consumed(world)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ("epoch", "batches", "samples") if isinstance(state, dict) and "samples" in state else (
            "epoch", "batches")
        s = _load_ints(state, keys, "ResumableLoader")
        if "samples" not in s and _rank_world()[1] > 1:  # saved by one process: it consumed batches * batch_size
            s["samples"] = min(s["batches"] * self.batch_size, len(self.dataset))
        self.epoch, self.batches, self._start = s["epoch"], s["batches"], 0
        if "samples" in s:  # continue from the samples all ranks consumed, sharded over this world size
            self.batches, self._start = 0, s["samples"]
        self._pending = False


def is_plain_dataloader(obj: Any) -> bool:
    """True for a ``torch.utils.data.DataLoader`` (without a saved position of its own)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.utils.data.DataLoader) and not hasattr(obj, "state_dict")

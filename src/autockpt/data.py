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
"""

from __future__ import annotations

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


class ResumableLoader:
    """A ``torch.utils.data.DataLoader`` whose position in the epoch is saved and restored exactly.

    Iterating it runs one epoch from the current position (like iterating a ``DataLoader``); the next
    iteration runs the next epoch. The position counts batches handed to the training loop, so prefetching
    and worker processes do not move it. On resume the sampler starts at the first batch not yet consumed:
    the skipped batches are never loaded, so the first batch comes as fast at the end of an epoch as at the
    start. Every epoch is shuffled by ``seed + epoch``; worker seeds come from a generator seeded the same way,
    so iterating never draws from torch's global RNG (which would break exact resume).

    Args:
        dataset: a map-style dataset (with ``len()``).
        batch_size, drop_last: as for ``DataLoader``.
        shuffle: a new permutation each epoch, seeded with ``seed + epoch``.
        seed: the base seed.
        **dataloader_options: any other ``DataLoader`` argument (``num_workers``, ``collate_fn``,
            ``pin_memory``, ...) except ``sampler``, ``batch_sampler``, ``shuffle`` and ``generator``.

    ```python
    import torch, autockpt
    ds = torch.utils.data.TensorDataset(torch.arange(100.0))
    loader = autockpt.ResumableLoader(ds, batch_size=10, shuffle=True, seed=0)
    it = iter(loader); a = next(it); b = next(it)
    saved = loader.state_dict()                 # {'epoch': 0, 'batches': 2}
    other = autockpt.ResumableLoader(ds, batch_size=10, shuffle=True, seed=0)
    other.load_state_dict(saved)
    assert torch.equal(next(iter(other))[0], next(it)[0])
    ```
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        **dataloader_options: Any,
    ) -> None:
        bad = sorted({"sampler", "batch_sampler", "shuffle", "generator"} & set(dataloader_options))
        if bad:
            raise InvalidArgumentError(
                f"ResumableLoader chooses the sampler and generator itself; do not pass {bad}. "
                "Use shuffle=/seed= for the order."
            )
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        if not isinstance(drop_last, bool):
            raise InvalidArgumentError(f"drop_last must be True or False, got {drop_last!r}")
        self.sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
        import torch

        self._generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
            generator=self._generator, **dataloader_options,
        )
        self.epoch = 0
        self.batches = 0

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if self.batches >= len(self.loader):  # the saved position is the end of an epoch
            self.epoch, self.batches = self.epoch + 1, 0
        epoch = self.epoch
        self.sampler.set_position(epoch, self.batches * self.batch_size)
        self._generator.manual_seed(self.sampler.seed + epoch)
        for batch in self.loader:
            self.batches += 1  # the loop has it now
            yield batch
        if self.epoch == epoch:
            self.epoch, self.batches = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = _load_ints(state, ("epoch", "batches"), "ResumableLoader")
        self.epoch, self.batches = s["epoch"], s["batches"]


def is_plain_dataloader(obj: Any) -> bool:
    """True for a ``torch.utils.data.DataLoader`` (without a saved position of its own)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.utils.data.DataLoader) and not hasattr(obj, "state_dict")

"""Every use of Keras (and torch DataLoader) internals by ``autockpt.integrations.keras``, in one place.

Tested against Keras 3.15.1 on the torch and TensorFlow (2.21) backends by
``tests/test_keras.py::test_keras_internals_pinned``; if a Keras release changes one of these, that test fails
and names it.

What we rely on:

1. ``Model.fit`` (torch, JAX and TensorFlow trainers alike) keeps its ``EpochIterator`` in a local named
   ``epoch_iterator`` and its ``CallbackList`` in a local named ``callbacks``, and reads
   ``model._initial_epoch`` right after ``callbacks.on_train_begin()`` (``initial_epoch = self._initial_epoch
   or initial_epoch``), which is also how Keras' own ``BackupAndRestore`` sets the starting epoch.
2. ``EpochIterator.__iter__`` calls ``self._enumerate_iterator()``, a generator yielding
   ``(begin_step, end_step, data_iterator)`` per step; ``__next__`` then pulls the batch from
   ``data_iterator``. We override ``_enumerate_iterator`` on the instance for one epoch to drop the first
   ``k`` steps, advancing ``data_iterator`` past their batches, so no train step and no callback runs for them.
3. On the JAX backend, ``model.jax_state_sync()`` writes the trainer's state back into the variables
   (needed before reading them in a batch callback).
4. A single-process map-style ``torch.utils.data.DataLoader`` iterator (what Keras builds for NumPy arrays
   on the torch backend) can move to its next batch with ``_next_index()`` without reading the data.
5. ``Model.fit`` calls every hook through its ``CallbackList`` instance (``callbacks.on_epoch_end(epoch,
   logs)`` and so on), so an attribute of that instance set in ``on_train_begin`` runs instead, for that fit
   only: this is how autockpt acts after every callback's hook, whatever the order of ``callbacks=``.
6. At each epoch end ``Model.fit`` validates only if ``self._should_eval(epoch, validation_freq)`` is true;
   an instance attribute of that name skips the validation of an epoch stopped by preemption.
7. TensorFlow backend: ``TFEpochIterator`` builds its ``tf.data`` dataset once per fit, in ``__init__``, as
   ``_distributed_dataset``, and makes its iterators with ``_get_iterator()`` (Keras 3.15: two per epoch,
   one when an epoch's batches are used up and one at the next epoch's start). A seeded ``Dataset.shuffle``
   (reshuffling each iteration) draws each new iterator's order from a seed generator of the dataset, so an
   epoch's order depends on how many iterators were made before it; making as many first (never read) as
   an uninterrupted fit had made replays it. NumPy inputs are shuffled by
   ``tf.random.shuffle`` in a map of that dataset, seeded from TensorFlow's global seed (set by
   ``keras.utils.set_random_seed``); every iterator then gives the same order.
8. TensorFlow backend: the trainer builds its compile metrics only when it traces the train step (first
   batch), unless a distribution strategy is set; ``Model._symbolic_build(data_batch=...)`` builds them
   from the dataset's ``element_spec`` (what the torch trainer does before ``on_train_begin``), so a
   checkpoint's running metrics can be checked and restored before the first batch.
9. torch backend: a ``Variable`` keeps its value in ``_value``, a ``torch.nn.Parameter`` that training
   updates in place (``_direct_assign`` is ``copy_``), so a detached view of it is the variable's own memory.

One job: every Keras internal the Keras callback touches, in one place. Imports nothing of autockpt
(keras, and torch or tensorflow when the backend uses them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any


def find_fit_locals(model: Any) -> dict[str, Any] | None:
    """The local variables of the running ``model.fit`` call (from a callback), or None if not found."""
    frame = sys._getframe(1)
    while frame is not None:
        loc = frame.f_locals
        if frame.f_code.co_name == "fit" and loc.get("self") is model and "epoch_iterator" in loc:
            return dict(loc)
        frame = frame.f_back  # type: ignore[assignment]
    return None


# Inputs whose batches at (epoch, batch) are a function of the RNG state at the epoch's start, which the
# callback replays: NumPy/array-like inputs, PyDataset, and torch DataLoaders (shuffled with torch's RNG).
# On the TensorFlow backend also seeded tf.data pipelines (see 7 above and ``tf_caveat``).
EXACT_ADAPTERS = ("ArrayDataAdapter", "PyDatasetAdapter", "TorchDataLoaderAdapter")


def mid_epoch_caveat(epoch_iterator: Any) -> str | None:
    """Why resuming this fit's data in the middle of an epoch may not be exact, or None if it is."""
    if getattr(epoch_iterator, "steps_per_epoch", None):
        return ("fit(steps_per_epoch=...) makes Keras carry one data iterator across epochs, so a batch's "
                "data depends on every earlier epoch, which autockpt does not replay")
    adapter = getattr(epoch_iterator, "data_adapter", None)
    name = type(adapter).__name__
    if getattr(adapter, "enqueuer", None) is not None:
        return ("a PyDataset with workers > 1 or use_multiprocessing shuffles in a background thread, whose "
                "draws from Python's RNG race with the main thread's")
    loader = getattr(adapter, "_dataloader", None)
    if loader is not None and (getattr(loader, "generator", None) is not None
                               or getattr(getattr(loader, "sampler", None), "generator", None) is not None):
        return "a torch DataLoader with its own generator= shuffles with an RNG autockpt does not save"
    if _tf_dataset(epoch_iterator) is not None and name in TF_ADAPTERS:  # TensorFlow backend
        return tf_caveat(epoch_iterator)
    if name not in EXACT_ADAPTERS:
        return (f"{name} input is skipped by drawing the epoch's first batches again from a fresh iterator, "
                "which is exact only if it yields the same batches in every process (a seeded, "
                "restartable generator or dataset; a tf.data pipeline's shuffle is replayed on the TensorFlow "
                "backend only)")
    return None


def _tf_dataset(epoch_iterator: Any) -> Any:
    """The ``tf.data`` dataset this fit iterates on the TensorFlow backend, or None (other backends)."""
    return getattr(epoch_iterator, "_distributed_dataset", None)


def _unseeded_shuffles(dataset: Any) -> list[str]:
    """The shuffles of a ``tf.data`` pipeline that draw a random seed in every process (no seed, no global seed)."""
    found, todo, seen = [], [dataset], set()
    while todo:
        ds = todo.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        if "Shuffle" in type(ds).__name__ and hasattr(ds, "_seed") and hasattr(ds, "_seed2"):
            if int(ds._seed) == 0 and int(ds._seed2) == 0:
                found.append(type(ds).__name__)
        inputs = getattr(ds, "_inputs", None)
        if callable(inputs):
            try:
                todo.extend(inputs())
            except Exception:  # a dataset kind that cannot list its inputs
                pass
    return found


def _tf_global_seed() -> int | None:
    from tensorflow.python.eager import context  # TensorFlow backend only

    seed: int | None = context.global_seed()
    return seed


TF_ADAPTERS = ("ArrayDataAdapter", "PyDatasetAdapter", "TFDatasetAdapter")


def tf_caveat(epoch_iterator: Any) -> str | None:
    """Why a TensorFlow-backend fit's data (one of ``TF_ADAPTERS``) may differ from process to process, or
    None if a resume replays it exactly."""
    dataset = _tf_dataset(epoch_iterator)
    if dataset is None:
        return None
    adapter = getattr(epoch_iterator, "data_adapter", None)
    name = type(adapter).__name__
    if name == "ArrayDataAdapter":
        if getattr(adapter, "_shuffle", False) and _tf_global_seed() is None:
            return ("on TensorFlow, fit shuffles NumPy arrays with tf.random.shuffle, whose seed is random in every "
                    "process unless keras.utils.set_random_seed(...) ran before fit")
        return None
    if name == "PyDatasetAdapter":
        return ("on TensorFlow, Keras reads a PyDataset through tf.data, which calls __getitem__ ahead of training "
                "in a background thread, so its random draws (augmentation, shuffle=True) are not replayed: make "
                "__getitem__(i) depend on i alone (e.g. np.random.default_rng(seed + i)) and pass shuffle=False, "
                "or use a seeded tf.data pipeline")
    if name == "TFDatasetAdapter":
        if _unseeded_shuffles(getattr(adapter, "_dataset", dataset)):
            return ("the tf.data pipeline has a shuffle without a seed, which shuffles differently in every "
                    "process: pass shuffle(buffer_size, seed=...) or call keras.utils.set_random_seed(...) "
                    "before building the dataset")
    return None


def count_iterators(epoch_iterator: Any) -> Callable[[], int] | None:
    """TensorFlow backend, ``tf.data`` input: count the iterators this fit makes of its dataset from now on
    (``_get_iterator`` calls); returns a function giving the count so far, or None for other inputs/backends.

    Counting (rather than assuming Keras 3.15's two per epoch) keeps a resume exact if a release changes it.
    """
    if _tf_dataset(epoch_iterator) is None:
        return None
    if type(getattr(epoch_iterator, "data_adapter", None)).__name__ != "TFDatasetAdapter":
        return None  # NumPy: the same order in every iterator; a PyDataset's iterator may call the user's code
    original = type(epoch_iterator)._get_iterator.__get__(epoch_iterator)
    count = [0]

    def counted() -> Any:
        count[0] += 1
        return original()

    epoch_iterator._get_iterator = counted
    return lambda: count[0]


def replay_iterators(epoch_iterator: Any, n: int) -> None:
    """TensorFlow backend: make (and drop, never read) ``n`` iterators of fit's dataset, as an uninterrupted
    fit had made before the epoch being resumed, so the next one has that epoch's order (see 7 above)."""
    for _ in range(n):
        iter(epoch_iterator._get_iterator())


def build_compile_state(model: Any, epoch_iterator: Any) -> None:
    """TensorFlow backend: build the compile metrics and loss now, as the torch trainer does before
    ``on_train_begin`` (the TF trainer builds them when it traces the first batch)."""
    dataset = _tf_dataset(epoch_iterator)
    metrics, loss = getattr(model, "_compile_metrics", None), getattr(model, "_compile_loss", None)
    unbuilt = any(m is not None and not m.built for m in (metrics, loss))
    spec = getattr(dataset, "element_spec", None)
    if unbuilt and spec is not None:
        model._symbolic_build(data_batch=spec)


def sync_backend_state(model: Any) -> None:
    """Make the model's variables current. The JAX trainer keeps them in its own state during an epoch
    (the variables are purged) and copies them back with ``model.jax_state_sync()``; other backends update
    the variables in place."""
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()


def variable_storage(variable: Any) -> Any:
    """Torch backend: the variable's own memory as a detached torch tensor (no copy), or None where the
    backend keeps its value otherwise (TensorFlow, JAX) or the variable is not built yet (see 9 above)."""
    torch = sys.modules.get("torch")
    value = getattr(variable, "_value", None)
    return value.detach() if torch is not None and isinstance(value, torch.Tensor) else None


def set_initial_epoch(model: Any, epoch: int | None) -> None:
    """Make the running ``fit`` start at ``epoch`` (call from ``on_train_begin``); None clears it."""
    model._initial_epoch = epoch


def intercept(callbacks: Any, hooks: dict[str, Callable[..., None]]) -> Callable[[], None]:
    """Route ``callbacks.<name>(*args)`` of the running fit through ``hooks[name](original, *args)``.

    ``callbacks`` is fit's ``CallbackList``; returns a function that puts the originals back.
    """
    for name, hook in hooks.items():
        if getattr(callbacks.__dict__.get(name), "_autockpt_routed", False):  # left by a fit that raised
            del callbacks.__dict__[name]
        original = getattr(callbacks, name)

        def routed(*args: Any, _hook: Callable[..., None] = hook, _original: Any = original, **kwargs: Any) -> None:
            _hook(_original, *args, **kwargs)

        routed._autockpt_routed = True  # type: ignore[attr-defined]
        setattr(callbacks, name, routed)

    def undo() -> None:
        for name in hooks:
            callbacks.__dict__.pop(name, None)

    return undo


def skip_validation(model: Any, skip: bool) -> None:
    """Make the running fit skip (``skip=True``) or run as usual (False) the validation of this epoch."""
    if skip:
        model._should_eval = lambda epoch, validation_freq: False
    else:
        model.__dict__.pop("_should_eval", None)


def _advance(data_iterator: Any) -> None:
    """Move ``data_iterator`` past one batch, without reading it where the iterator allows."""
    kind = getattr(data_iterator, "_dataset_kind", None)
    if (
        kind is not None
        and callable(getattr(data_iterator, "_next_index", None))
        and getattr(data_iterator, "_num_workers", 1) == 0
        and kind == sys.modules["torch.utils.data.dataloader"]._DatasetKind.Map
    ):
        data_iterator._next_index()
        data_iterator._num_yielded += 1
        return
    next(data_iterator)


def skip_steps_next_epoch(epoch_iterator: Any, k: int, after_skip: Callable[[], None]) -> None:
    """Make the next epoch of ``epoch_iterator`` start at step ``k``; ``after_skip()`` runs once it is there.

    The data iterator is created and advanced exactly as in a full epoch (so shuffling draws the same
    random numbers), but the first ``k`` batches are neither trained on nor shown to callbacks.
    """
    original = type(epoch_iterator)._enumerate_iterator.__get__(epoch_iterator)

    def skipping() -> Iterator[tuple[int, int, Any]]:
        del epoch_iterator._enumerate_iterator  # one epoch only
        done = False
        for begin, end, data_iterator in original():
            if begin < k:
                for _ in range(end - begin + 1):
                    _advance(data_iterator)
                if end + 1 >= k:
                    after_skip()
                    done = True
                continue
            if not done:
                after_skip()
                done = True
            yield begin, end, data_iterator
        if not done:
            after_skip()

    epoch_iterator._enumerate_iterator = skipping

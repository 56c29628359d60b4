"""The state tree: turning nested state into a JSON tree plus a list of tensors, and back.

One job: tree encoding (see the node kinds in ``autockpt.format``). Imports ``autockpt.errors`` and
``autockpt.format.dtypes``.
"""

from __future__ import annotations

import base64
import gc
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autockpt.errors import CorruptCheckpointError, UnsupportedValueError
from autockpt.format.dtypes import (
    ST_DTYPES,
    is_stateful,
    is_torch_tensor,
    tensor_dtype_code,
    tensor_shape,
)


@dataclass
class TensorEntry:
    """A tensor to be written: where it sits in the tree, its framework, dtype and shape."""

    name: str
    value: Any
    framework: str  # "torch", "numpy" or "numpy_scalar"
    dtype: str
    shape: list[int]

    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = math.prod(self.shape) * ST_DTYPES[self.dtype][1]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while many small objects are made (a tree of 20,000 tensors, its
    manifest): its collections would cost as much as writing the bytes. Nothing is freed later than it would
    be by reference counting; only cycles wait. On the main thread only (a background save must not pause the
    training thread's collector), and a no-op when the collector is already off (nested use).

    ```python
    import gc
    from autockpt.format.tree import paused_gc
    with paused_gc():
        items = [{"i": i} for i in range(100_000)]
    assert gc.isenabled()
    ```
    """
    if not gc.isenabled() or threading.current_thread() is not threading.main_thread():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path) or "<root>"


class TreeEncoder:
    """Turns a state mapping into a JSON tree plus a list of tensors. Calls ``state_dict()`` on statefuls."""

    def __init__(self) -> None:
        self.tensors: list[TensorEntry] = []
        self._names: set[str] = set()
        torch = sys.modules.get("torch")
        self._torch_tensor: Any = torch.Tensor if torch is not None else ()

    def _tensor_name(self, path: tuple[Any, ...]) -> str:
        base = "/".join(map(str, path)) or "tensor"
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def encode(self, value: Any, path: tuple[Any, ...] = ()) -> Any:
        """The JSON tree of ``value`` (at key path ``path``); its tensors are appended to ``self.tensors``."""
        if not gc.isenabled():  # already paused (the manager pauses it around a whole state)
            return self._encode(value, path)
        with paused_gc():
            return self._encode(value, path)

    def _encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, self._torch_tensor):  # the common case first: one isinstance per tensor
            try:
                code = tensor_dtype_code(value)
            except UnsupportedValueError as e:
                raise UnsupportedValueError(f"{e} (at key path {_path_str(path)!r})") from None
            entry = TensorEntry(self._tensor_name(path), value, "torch", code, list(value.shape))
            self.tensors.append(entry)
            return {"type": "tensor", "name": entry.name}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, np.generic):
            return int(value)
        if isinstance(value, float) and not isinstance(value, np.generic):
            return float(value) if math.isfinite(value) else {"type": "float", "value": repr(float(value))}
        if isinstance(value, (np.ndarray, np.generic)) or is_torch_tensor(value):
            if isinstance(value, np.generic):
                framework = "numpy_scalar"
            elif isinstance(value, np.ndarray):
                framework = "numpy"
            else:
                framework = "torch"
            try:
                code = tensor_dtype_code(value)
            except UnsupportedValueError as e:
                raise UnsupportedValueError(f"{e} (at key path {_path_str(path)!r})") from None
            entry = TensorEntry(self._tensor_name(path), value, framework, code, tensor_shape(value))
            self.tensors.append(entry)
            return {"type": "tensor", "name": entry.name}
        if isinstance(value, (bytes, bytearray)):
            return {"type": "bytes", "b64": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value):
                return {"type": "dict", "items": {k: self._encode(v, (*path, k)) for k, v in value.items()}}
            pairs = []
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                    raise UnsupportedValueError(
                        f"dict key {k!r} of type {type(k).__name__} at key path {_path_str(path)!r} cannot be "
                        "stored without pickle; use str, int, float, bool, None or tuples of those as keys"
                    )
                pairs.append([self._encode(k, (*path, "<key>")), self._encode(v, (*path, k))])
            return {"type": "dict", "pairs": pairs}
        if isinstance(value, list):
            return [self._encode(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple) and (type(value) is tuple or type(value).__name__ == "Size"):
            return {"type": "tuple", "items": [self._encode(v, (*path, i)) for i, v in enumerate(value)]}
        if is_stateful(value):
            return {
                "type": "stateful",
                "class": f"{type(value).__module__}.{type(value).__qualname__}",
                "state": self._encode(value.state_dict(), path),
            }
        raise UnsupportedValueError(
            f"value of type {type(value).__module__}.{type(value).__qualname__} at key path {_path_str(path)!r} "
            "cannot be stored without pickle. Store tensors, numpy arrays, plain Python values (int, float, str, "
            "bool, None, bytes, list, tuple, dict) or objects with state_dict()/load_state_dict()."
        )


def _child(like: Any, key: Any) -> Any:
    if isinstance(like, Mapping):
        try:
            return like.get(key)
        except TypeError:
            return None
    if isinstance(like, (list, tuple)) and isinstance(key, int) and 0 <= key < len(like):
        return like[key]
    return None


def decode_tree(node: Any, tensor: Callable[[str, Any], Any], path: tuple[Any, ...] = (), like: Any = None) -> Any:
    """Rebuild plain values from a manifest tree; ``tensor(name, like)`` supplies each tensor.

    ``like`` is the value at the same place in the object being restored (or None); it is handed to
    ``tensor`` so that a tensor can be read straight into the target's own memory.
    """
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode_tree(v, tensor, (*path, i), _child(like, i)) for i, v in enumerate(node)]
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise CorruptCheckpointError(f"malformed state tree node at key path {_path_str(path)!r}")
    kind = node["type"]
    try:
        if kind == "tensor":
            if not isinstance(node["name"], str):
                raise TypeError("tensor name is not a string")
            return tensor(node["name"], like)
        if kind == "tuple":
            return tuple(decode_tree(v, tensor, (*path, i), _child(like, i)) for i, v in enumerate(node["items"]))
        if kind == "dict" and "items" in node:
            return {str(k): decode_tree(v, tensor, (*path, k), _child(like, k)) for k, v in node["items"].items()}
        if kind == "dict":
            out = {}
            for k, v in node["pairs"]:
                key = decode_tree(k, tensor, (*path, "<key>"))
                out[key] = decode_tree(v, tensor, (*path, key), _child(like, key))
            return out
        if kind == "float":
            return float(node["value"])
        if kind == "bytes":
            return base64.b64decode(node["b64"], validate=True)
        if kind == "stateful":
            return decode_tree(node["state"], tensor, path, like)
        if kind == "per_rank":  # autockpt.PerRank: one value per rank that saved, as a list indexed by rank
            if not isinstance(node["ranks"], list):
                raise TypeError("ranks is not a list")
            return [decode_tree(v, tensor, (*path, f"rank {r}")) for r, v in enumerate(node["ranks"])]
    except CorruptCheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CorruptCheckpointError(f"malformed {kind!r} node at key path {_path_str(path)!r}: {e}") from None
    raise CorruptCheckpointError(f"unknown node type {kind!r} at key path {_path_str(path)!r}")

"""Restoring a checkpoint into live objects: check everything first, then copy in place.

``check`` compares the target state with the checkpoint's tree (tensors as :class:`TensorMeta`
placeholders, no data read) and raises :class:`~autockpt.errors.StateMismatchError` naming every missing,
unexpected or mismatched key (a stateful object of the state may name its keys for people: see
:func:`check`). Only then ``apply`` copies values: tensors with ``copy_``/``copyto`` into the
existing storage (parameters keep their identity), stateful objects through ``load_state_dict``, plain
values by replacing them in their container.

Imports ``autockpt.errors`` and ``autockpt.format``.

One job: check a checkpoint against live objects, then copy it into them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import numpy as np

from autockpt.errors import InvalidArgumentError, StateMismatchError
from autockpt.format import TensorMeta, decode_tree, is_stateful, is_tensor, is_torch_tensor, tensor_dtype_code

TensorSource = Callable[[str, Any], Any]  # (name, like) -> tensor, read into ``like`` where it fits


def _p(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _has_tensors(value: Any) -> bool:
    if is_tensor(value) or is_stateful(value):
        return True
    if isinstance(value, Mapping):
        return any(_has_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensors(v) for v in value)
    return False


def _stateful_node(node: Any) -> Any:
    return node["state"] if isinstance(node, dict) and node.get("type") == "stateful" else node


class _Checker:
    def __init__(self, describers: Mapping[str, Callable[[str], Any]]) -> None:
        self.describers = describers  # top-level key -> its object's describe_key
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []

    def _label(self, path: tuple[Any, ...]) -> str:
        """The key path, followed by the name its object gives it (``model/0000 dense/kernel``), if any."""
        text = _p(path)
        describe = self.describers.get(path[0]) if len(path) > 1 else None
        name = describe(_p(path[1:])) if describe is not None else None
        return f"{text} {name}" if isinstance(name, str) and name else text

    def compare(self, target: Any, saved: Any, path: tuple[Any, ...]) -> None:
        if is_tensor(target):
            if not isinstance(saved, TensorMeta):
                self.mismatched.append(
                    f"{self._label(path)} (expected a tensor, the checkpoint has {type(saved).__name__})"
                )
                return
            dtype, shape = tensor_dtype_code(target), tuple(int(d) for d in target.shape)
            if (dtype, shape) != (saved.dtype, saved.shape):
                self.mismatched.append(
                    f"{self._label(path)} (target {dtype}{list(shape)}, checkpoint {saved.dtype}{list(saved.shape)})"
                )
        elif isinstance(target, Mapping):
            if not isinstance(saved, Mapping):
                if _has_tensors(target):
                    self.mismatched.append(f"{self._label(path)} (expected a mapping, got {type(saved).__name__})")
                return
            flat = len(target) > 0 and all(is_tensor(v) for v in target.values())
            if flat:  # a module-like state dict: every key must be there, nothing more
                self.missing += [self._label((*path, k)) for k in target if k not in saved]
                self.unexpected += [self._label((*path, k)) for k in saved if k not in target]
            if "param_groups" in target and "param_groups" in saved:  # an optimizer
                tg, sg = target["param_groups"], saved["param_groups"]
                if not isinstance(sg, list) or len(tg) != len(sg) or any(
                    len(a.get("params", ())) != len(b.get("params", ()) if isinstance(b, Mapping) else ())
                    for a, b in zip(tg, sg, strict=False)
                ):
                    self.mismatched.append(
                        f"{self._label((*path, 'param_groups'))} (parameter groups or their sizes differ)"
                    )
            for k in target:
                if k in saved:
                    self.compare(target[k], saved[k], (*path, k))
        elif isinstance(target, (list, tuple)):
            if not isinstance(saved, (list, tuple)):
                if _has_tensors(target):
                    self.mismatched.append(f"{self._label(path)} (expected a sequence, got {type(saved).__name__})")
                return
            if _has_tensors(target) and len(target) != len(saved):
                self.mismatched.append(f"{self._label(path)} (length {len(target)} vs {len(saved)} in the checkpoint)")
                return
            for i, (t, s) in enumerate(zip(target, saved, strict=False)):
                self.compare(t, s, (*path, i))


def check(state: Mapping[str, Any], tree: Mapping[str, Any], metas: Mapping[str, TensorMeta]) -> None:
    """Raise StateMismatchError unless the checkpoint tree fits ``state``. Reads no tensor data.

    The error lists key paths (``model/0003``). A stateful object of ``state`` that stores its values under
    keys people cannot read may have a method ``describe_key(key) -> str | None`` (``key`` is the path inside
    its ``state_dict()``, joined by "/"): its answer follows the path in messages (``model/0003
    dense/kernel``). It names things for people only; what is stored and compared is the key.
    """

    def meta(name: str, like: Any) -> TensorMeta:
        return metas[name]

    describers = {k: v.describe_key for k, v in state.items() if callable(getattr(v, "describe_key", None))}
    c = _Checker(describers)
    c.missing += [k for k in state if k not in tree]
    c.unexpected += [k for k in tree if k not in state]
    for key, target in state.items():
        if key not in tree:
            continue
        saved = decode_tree(tree[key], meta, (key,))
        if is_stateful(target) and not is_tensor(target):
            c.compare(target.state_dict(), saved, (key,))
        else:
            c.compare(target, saved, (key,))
    if c.missing or c.unexpected or c.mismatched:
        parts = []
        for what, keys in (("missing", c.missing), ("unexpected", c.unexpected), ("mismatched", c.mismatched)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{what}: {shown}")
        raise StateMismatchError(
            "checkpoint does not fit the state it is restored into; nothing was restored. " + "; ".join(parts),
            missing=c.missing,
            unexpected=c.unexpected,
            mismatched=c.mismatched,
        )


def _copy_into(target: Any, src: Any) -> None:
    if src is target:  # already read into the target's own memory
        return
    if is_torch_tensor(target):
        torch = sys.modules["torch"]
        if not is_torch_tensor(src):
            src = torch.from_numpy(np.asarray(src))
        with torch.no_grad():
            target.copy_(src)
    else:
        np.copyto(target, np.asarray(src) if not is_torch_tensor(src) else src.numpy())


def _apply_into(container: Any, key: Any, target: Any, node: Any, tensor: TensorSource, path: tuple[Any, ...]) -> None:
    if is_tensor(target):
        _copy_into(target, tensor(node["name"], target))
    elif is_stateful(target):
        # Tensors are read straight into the ones the object's state_dict() returns (for a module: its
        # parameters and buffers), then handed to load_state_dict, which keeps its usual semantics.
        target.load_state_dict(decode_tree(_stateful_node(node), tensor, path, like=target.state_dict()))
    elif isinstance(target, MutableMapping) and _has_tensors(target) and isinstance(node, dict) and "items" in node:
        for k, sub in node["items"].items():
            if k in target:
                _apply_into(target, k, target[k], sub, tensor, (*path, k))
            else:
                target[k] = decode_tree(sub, tensor, (*path, k))
    elif isinstance(target, list) and _has_tensors(target) and isinstance(node, list):
        for i, sub in enumerate(node):
            _apply_into(target, i, target[i], sub, tensor, (*path, i))
    else:
        try:
            container[key] = decode_tree(node, tensor, path)
        except TypeError:
            raise InvalidArgumentError(
                f"cannot restore {_p(path)!r} in place: its container {type(container).__name__} is immutable; "
                "pass a dict (or a list) so that plain values can be replaced"
            ) from None


def apply(state: MutableMapping[str, Any], tree: Mapping[str, Any], tensor: TensorSource) -> None:
    """Copy the checkpoint into ``state`` in place. Call :func:`check` first."""
    for key in state:
        _apply_into(state, key, state[key], tree[key], tensor, (key,))

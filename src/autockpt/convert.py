"""Foreign checkpoint files: reading torch.save / safetensors / Lightning / Keras ``.weights.h5`` files into a
state to save, and writing the tensors of a state out as a ``.safetensors`` or ``.pt`` file.

One job: conversion to and from other tools' formats (the CLI's ``import`` and ``export`` call it). Reading a
pickle happens only with ``trust_pickle=True``. Imports ``autockpt.errors`` and ``autockpt.format``; torch,
safetensors and h5py only when a conversion needs them.
"""

from __future__ import annotations

import re
from typing import Any

from autockpt.errors import InvalidArgumentError


class ConversionError(InvalidArgumentError):
    """A file cannot be converted; the message says why and what to do."""


def _is_array(value: Any) -> bool:
    import numpy as np

    from autockpt.format import is_torch_tensor

    return isinstance(value, (np.ndarray, np.generic)) or is_torch_tensor(value)


def flatten_tensors(tree: Any, prefix: str = "") -> tuple[dict[str, Any], int]:
    """Tensors of a decoded state tree under dotted names (``0.weight``), and how many other leaves it had."""
    out: dict[str, Any] = {}
    dropped = 0

    def walk(node: Any, name: str) -> None:
        nonlocal dropped
        if _is_array(node):
            if name in out:
                raise ConversionError(f"two tensors would both be exported as {name!r}; pick a sub-tree with --key")
            out[name or "tensor"] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}" if name else str(i))
        else:
            dropped += 1

    walk(tree, prefix)
    return out, dropped


def write_tensors(dest: str, kind: str, tensors: dict[str, Any], step: int) -> None:
    """Write ``tensors`` (dotted name -> array) to ``dest`` as ``kind`` ("safetensors" or "pt")."""
    import importlib

    import numpy as np

    torch: Any
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        torch = None
    if kind == "pt" and torch is None:
        raise ConversionError("exporting to .pt needs torch; install it, or export to .safetensors")
    if torch is not None:
        out = {n: (torch.from_numpy(np.ascontiguousarray(v)) if not isinstance(v, torch.Tensor) else v)
               for n, v in tensors.items()}
        if kind == "pt":
            torch.save(out, dest)
        else:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in out.items()}, dest, metadata={"autockpt_step": str(step)})
    else:
        from safetensors.numpy import save_file as np_save_file

        np_save_file({n: np.ascontiguousarray(v) for n, v in tensors.items()}, dest,
                     metadata={"autockpt_step": str(step)})


def _torch_load(path: str, trust_pickle: bool) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if found:
                raise ConversionError(
                    f"{path} holds Python objects such as {found.group(1)} beyond tensors and plain values, so "
                    "torch.load(weights_only=True) refused it. Loading it runs pickle, which can execute arbitrary "
                    "code: only if you trust where the file came from, run again with --trust-pickle."
                ) from None
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
            raise ConversionError(
                f"cannot read {path} safely: torch.load(weights_only=True) failed "
                f"({detail[0] if detail else type(e).__name__}). If it is a torch.save file from a source you "
                "trust, --trust-pickle reads it with pickle (which can execute arbitrary code)."
            ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_h5(path: str) -> dict[str, Any]:
    try:
        import h5py
    except ImportError:
        raise ConversionError("importing a Keras .weights.h5 file needs h5py: pip install h5py") from None
    import numpy as np

    out: dict[str, Any] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = np.asarray(obj[()])

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def _is_lightning(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and any(
        k in obj for k in ("pytorch-lightning_version", "lightning_version", "global_step", "epoch")
    )


def read_foreign(src: str, trust_pickle: bool) -> tuple[dict[str, Any], str]:
    """The state to save for a foreign checkpoint file, and what kind of file it was."""
    if src.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file as torch_load_file

            loaded: dict[str, Any] = dict(torch_load_file(src))
        except ImportError:
            from safetensors.numpy import load_file as numpy_load_file

            loaded = dict(numpy_load_file(src))
        return {"model": loaded}, "safetensors"
    if src.endswith(".weights.h5"):
        return {"model": _read_h5(src)}, "keras.weights.h5"
    if src.endswith((".pt", ".pth", ".ckpt", ".bin")):
        obj = _torch_load(src, trust_pickle)
        if _is_lightning(obj):
            return {"lightning": obj}, "lightning.ckpt"
        if isinstance(obj, dict):
            return {"model": obj}, "torch.state_dict"
        raise ConversionError(f"{src} holds a {type(obj).__module__}.{type(obj).__qualname__}, not a state dict; "
                       "save model.state_dict() instead of the model")
    raise ConversionError(f"{src!r}: unknown kind of file; autockpt imports .safetensors, .pt/.pth/.bin (torch.save), "
                   ".ckpt (Lightning) and .weights.h5 (Keras)")

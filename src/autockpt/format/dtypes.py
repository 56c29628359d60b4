"""Tensor kinds and their bytes: the safetensors dtype tables, torch/numpy detection, a tensor's host bytes.

One job: what a tensor is and how its bytes look. torch is never imported here (only looked up in
``sys.modules``). Imports only ``autockpt.errors``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from autockpt.errors import UnsupportedValueError

# safetensors dtype code -> (numpy dtype or None, item size)
ST_DTYPES: dict[str, tuple[Any, int]] = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (None, 2),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U64": (np.uint64, 8),
    "U32": (np.uint32, 4),
    "U16": (np.uint16, 2),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
    "F8_E4M3": (None, 1),
    "F8_E5M2": (None, 1),
    "C64": (np.complex64, 8),
}
NP_TO_ST = {np.dtype(v[0]).str: k for k, v in ST_DTYPES.items() if v[0] is not None}
TORCH_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def _torch() -> Any:
    """The torch module if the program already imported it, else None (autockpt never imports it first)."""
    return sys.modules.get("torch")


def is_torch_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def is_tensor(value: Any) -> bool:
    """A torch tensor or a numpy array (numpy scalars are saved as 0-d tensors but are not targets)."""
    return isinstance(value, np.ndarray) or is_torch_tensor(value)


def is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


_DTYPE_CODES: dict[Any, str] = {}  # dtype object -> safetensors code, filled as dtypes are met


def tensor_dtype_code(value: Any) -> str:
    """The safetensors dtype code of a torch tensor or numpy array; raises for unsupported dtypes."""
    dtype = value.dtype
    code = _DTYPE_CODES.get(dtype)
    if code is not None:
        return code
    if is_torch_tensor(value):
        code = TORCH_TO_ST.get(str(dtype).removeprefix("torch."))
    else:
        code = NP_TO_ST.get(np.dtype(dtype).str)
    if code is None:
        raise UnsupportedValueError(f"tensor dtype {dtype} cannot be stored in safetensors")
    _DTYPE_CODES[dtype] = code
    return code


def tensor_shape(value: Any) -> list[int]:
    return [int(d) for d in value.shape]


def tensor_bytes(value: Any) -> memoryview:
    """A flat, contiguous, host-memory byte view of a tensor (copies only when it must)."""
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach()
        if type(t) is torch.Tensor:  # the fast path: numpy() refuses what it cannot view (device, dtype, bits)
            try:
                view = t.numpy()
            except (TypeError, RuntimeError):
                view = None
            if view is not None and view.ndim and view.size and view.flags.c_contiguous:
                return memoryview(view).cast("B")
        if t.device.type == "cpu" and t.is_contiguous() and t.layout == torch.strided and not t.is_quantized \
                and not t.is_conj() and not t.is_neg():
            if str(t.dtype) in _NUMPY_VIEWABLE and t.numel():  # the fast path: no torch calls beyond numpy()
                return memoryview(t.numpy()).cast("B") if t.dim() else memoryview(t.numpy().reshape(1)).cast("B")
        elif t.layout != torch.strided or t.is_quantized:
            raise UnsupportedValueError(f"tensor layout {t.layout} (quantized={t.is_quantized}) is not supported")
        elif t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        if t.numel() == 0:
            return memoryview(b"")
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())
    arr: Any = np.ascontiguousarray(value)
    return memoryview(arr.reshape(-1).view(np.uint8))


# torch dtypes whose CPU tensors numpy() can view directly (by name: torch may not be imported)
_NUMPY_VIEWABLE = frozenset({"torch.float64", "torch.float32", "torch.float16", "torch.int64", "torch.int32",
                             "torch.int16", "torch.int8", "torch.uint8", "torch.bool", "torch.complex64"})



@dataclass(frozen=True)
class TensorMeta:
    """A tensor of the checkpoint, before its data is read."""

    name: str
    dtype: str
    shape: tuple[int, ...]

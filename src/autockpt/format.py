"""The on-storage format: a state tree in a JSON manifest, its tensors in a safetensors file.

A checkpoint directory holds ``tensors.safetensors`` (every tensor, named by its key path, readable with
``safetensors.safe_open``) and ``manifest.json``. The manifest is written last; it records the state tree
with every plain value, each tensor's dtype, shape and byte range, each file's size and xxh3-64 checksum,
metrics, user metadata and library versions, and a checksum of itself. Nothing here is ever pickled.

State tree nodes in the manifest: ``null``/``true``/``false``, integers, strings, finite floats and JSON
lists stand for themselves; every JSON object is a tagged node ``{"type": ...}``: ``tensor``, ``tuple``,
``dict`` (``items`` for string keys, ``pairs`` otherwise), ``float`` (non-finite), ``bytes`` and
``stateful`` (an object saved through its ``state_dict()``).
"""

from __future__ import annotations

import base64
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import xxhash

from autockpt.errors import CorruptCheckpointError, InvalidArgumentError, UnsupportedValueError
from autockpt.storage.names import MAX_MANIFEST_BYTES, valid_file_name

FORMAT_VERSION = 1
TENSORS_NAME = "tensors.safetensors"
CHECKSUM = "xxh3_64"
MAX_HEADER_BYTES = 100 * 2**20  # the limit the safetensors library itself applies
_CHUNK = 64 * 2**20
_SMALL = 1 * 2**20  # tensors below this size are written in batches ...
_BATCH = 8 * 2**20  # ... of about this size

# safetensors dtype code -> (numpy dtype or None, item size)
_ST_DTYPES: dict[str, tuple[Any, int]] = {
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
_NP_TO_ST = {np.dtype(v[0]).str: k for k, v in _ST_DTYPES.items() if v[0] is not None}
_TORCH_ST = {
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
_ST_TORCH = {v: k for k, v in _TORCH_ST.items()}


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
        code = _TORCH_ST.get(str(dtype).removeprefix("torch."))
    else:
        code = _NP_TO_ST.get(np.dtype(dtype).str)
    if code is None:
        raise UnsupportedValueError(f"tensor dtype {dtype} cannot be stored in safetensors")
    _DTYPE_CODES[dtype] = code
    return code


def tensor_shape(value: Any) -> list[int]:
    return [int(d) for d in value.shape]


def tensor_bytes(value: Any) -> memoryview:
    """A flat, contiguous, host-memory byte view of a tensor (copies only when it must)."""
    if is_torch_tensor(value):
        torch = _torch()
        t = value.detach()
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


# --------------------------------------------------------------------------------------------- tree encoding


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
        self.nbytes = math.prod(self.shape) * _ST_DTYPES[self.dtype][1]


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path) or "<root>"


class TreeEncoder:
    """Turns a state mapping into a JSON tree plus a list of tensors. Calls ``state_dict()`` on statefuls."""

    def __init__(self) -> None:
        self.tensors: list[TensorEntry] = []
        self._names: set[str] = set()

    def _tensor_name(self, path: tuple[Any, ...]) -> str:
        base = "/".join(str(p) for p in path) or "tensor"
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def encode(self, value: Any, path: tuple[Any, ...] = ()) -> Any:
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
                return {"type": "dict", "items": {k: self.encode(v, (*path, k)) for k, v in value.items()}}
            pairs = []
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                    raise UnsupportedValueError(
                        f"dict key {k!r} of type {type(k).__name__} at key path {_path_str(path)!r} cannot be "
                        "stored without pickle; use str, int, float, bool, None or tuples of those as keys"
                    )
                pairs.append([self.encode(k, (*path, "<key>")), self.encode(v, (*path, k))])
            return {"type": "dict", "pairs": pairs}
        if isinstance(value, list):
            return [self.encode(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple) and (type(value) is tuple or type(value).__name__ == "Size"):
            return {"type": "tuple", "items": [self.encode(v, (*path, i)) for i, v in enumerate(value)]}
        if is_stateful(value):
            return {
                "type": "stateful",
                "class": f"{type(value).__module__}.{type(value).__qualname__}",
                "state": self.encode(value.state_dict(), path),
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
    except CorruptCheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CorruptCheckpointError(f"malformed {kind!r} node at key path {_path_str(path)!r}: {e}") from None
    raise CorruptCheckpointError(f"unknown node type {kind!r} at key path {_path_str(path)!r}")


# --------------------------------------------------------------------------------------------- safetensors


def safetensors_header(entries: list[TensorEntry]) -> tuple[bytes, dict[str, list[int]]]:
    """The header bytes (length prefix included) and each tensor's [begin, end) data offsets.

    Tensors are laid out by decreasing item size so that every tensor is aligned to its item size.
    """
    order = sorted(entries, key=lambda e: -_ST_DTYPES[e.dtype][1])
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "autockpt_format_version": str(FORMAT_VERSION)}}
    offsets: dict[str, list[int]] = {}
    pos = 0
    for e in order:
        offsets[e.name] = [pos, pos + e.nbytes]
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": offsets[e.name]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def write_safetensors(
    f: BinaryIO, entries: list[TensorEntry], on_bytes: Callable[[int], None] | None = None
) -> tuple[int, str, dict[str, list[int]]]:
    """Stream ``entries`` into ``f`` as a safetensors file; returns (size, xxh3-64 hex, offsets).

    ``on_bytes(n)`` is told of every chunk written (for progress reporting)."""
    header, offsets = safetensors_header(entries)
    h = xxhash.xxh3_64()
    pending = bytearray(header)  # small tensors are gathered into few large writes
    size = 0

    def flush() -> None:
        nonlocal size
        if pending:
            f.write(pending)
            h.update(pending)
            size += len(pending)
            if on_bytes is not None:
                on_bytes(len(pending))
            pending.clear()

    for entry in sorted(entries, key=lambda e: offsets[e.name][0]):
        data = tensor_bytes(entry.value)
        if len(data) != entry.nbytes:
            raise UnsupportedValueError(f"tensor {entry.name!r} changed shape while it was being saved")
        if len(data) < _SMALL:
            pending += data
            if len(pending) >= _BATCH:
                flush()
            continue
        flush()
        for i in range(0, len(data), _CHUNK):
            chunk = data[i : i + _CHUNK]
            f.write(chunk)
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        size += len(data)
    flush()
    return size, h.hexdigest(), offsets


def parse_safetensors_header(
    read: Callable[[int, int], bytes], file_size: int, file_name: str
) -> tuple[int, dict[str, Any]]:
    """Parse and bound-check a safetensors header; ``read(offset, n)`` reads the file. Returns (data start,
    {name: entry}); raises CorruptCheckpointError for anything out of bounds, overlapping or malformed."""
    if file_size < 8:
        raise CorruptCheckpointError(f"{file_name}: {file_size} bytes is too short for a safetensors file")
    n = int.from_bytes(read(0, 8), "little")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CorruptCheckpointError(f"{file_name}: header length {n} exceeds the file or the limit")
    try:
        header = json.loads(read(8, n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{file_name}: malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file_name}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = file_size - 8 - n
    spans = []
    for name, item in header.items():
        try:
            dtype, shape, (b, end) = item["dtype"], item["shape"], item["data_offsets"]
            ok = dtype in _ST_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(b, int) and isinstance(end, int) and 0 <= b <= end <= data_len
            ok = ok and end - b == math.prod(shape) * _ST_DTYPES[dtype][1]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptCheckpointError(f"{file_name}: invalid header entry for tensor {name!r}")
        spans.append((b, end))
    spans.sort()
    pos = 0
    for b, end in spans:
        if b != pos:
            raise CorruptCheckpointError(f"{file_name}: tensor byte ranges overlap or leave holes")
        pos = end
    if pos != data_len:
        raise CorruptCheckpointError(f"{file_name}: {data_len - pos} bytes after the last tensor")
    return 8 + n, header


# --------------------------------------------------------------------------------------------- manifest


def library_versions() -> dict[str, str]:
    from autockpt import __version__

    versions = {"autockpt": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "keras", "lightning", "safetensors", "fsspec"):
        m = sys.modules.get(mod)
        if m is not None and isinstance(getattr(m, "__version__", None), str):
            versions[mod] = m.__version__
    return versions


def json_plain(value: Any, what: str) -> Any:
    """Check that ``value`` is plain JSON (str keys); raises InvalidArgumentError naming ``what``."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} must be plain JSON (str keys, finite numbers): {e}") from None


_PREFIX = b'{"body": '
_SUFFIX_LEN = len(', "body_xxh3_64": "0123456789abcdef"}\n')


def dump_manifest(body: dict[str, Any]) -> bytes:
    """Serialise a manifest: ``{"body": ..., "body_xxh3_64": ...}`` with the checksum over the body's bytes."""
    text = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    digest = xxhash.xxh3_64_hexdigest(text)
    return _PREFIX + text + f', "body_xxh3_64": "{digest}"}}\n'.encode()


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and self-verify a manifest's bytes; raises CorruptCheckpointError."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{where}: manifest of {len(raw)} bytes exceeds the limit")
    if not raw.startswith(_PREFIX) or len(raw) < len(_PREFIX) + _SUFFIX_LEN:
        raise CorruptCheckpointError(f"{where}: manifest.json is not an autockpt manifest")
    text, suffix = raw[len(_PREFIX) : -_SUFFIX_LEN], raw[-_SUFFIX_LEN:]
    expected = f', "body_xxh3_64": "{xxhash.xxh3_64_hexdigest(text)}"}}\n'.encode()
    if suffix != expected:
        raise CorruptCheckpointError(f"{where}: manifest checksum does not match its content")
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: malformed manifest: {e}") from None
    if not isinstance(body, dict) or body.get("format") != "autockpt":
        raise CorruptCheckpointError(f"{where}: manifest is not an autockpt manifest")
    if body.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: format version {body.get('format_version')!r} is not supported by this autockpt "
            f"(it reads version {FORMAT_VERSION}); upgrade autockpt to read it"
        )
    for key, typ in (("step", int), ("created", float), ("state", dict), ("tensors", dict), ("files", dict)):
        val = body.get(key)
        if typ is float and isinstance(val, int):
            val = float(val)
        if not isinstance(val, typ) or isinstance(val, bool):
            raise CorruptCheckpointError(f"{where}: manifest field {key!r} is missing or of the wrong type")
    for name, f in body["files"].items():
        if not valid_file_name(name) or not isinstance(f, dict) or not isinstance(f.get("size"), int) \
                or not isinstance(f.get(CHECKSUM), str):
            raise CorruptCheckpointError(f"{where}: manifest lists an invalid file entry {name!r}")
    for name, t in body["tensors"].items():
        if not isinstance(t, dict) or not isinstance(t.get("file"), str) or t["file"] not in body["files"]:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} names a file the manifest does not list")
    return body


def new_manifest(
    step: int,
    state_tree: dict[str, Any],
    tensors: dict[str, dict[str, Any]],
    files: dict[str, dict[str, Any]],
    metrics: dict[str, float | None],
    metadata: dict[str, Any],
    run_start: float,
) -> dict[str, Any]:
    now = time.time()
    return {
        "format": "autockpt",
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": now,
        "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "run_start": run_start,
        "metrics": metrics,
        "metadata": metadata,
        "versions": library_versions(),
        "files": files,
        "tensors": tensors,
        "state": state_tree,
    }

"""safetensors files: writing one from tensor entries (streamed, checksummed) and bound-checking a header.

One job: the safetensors container. Imports ``autockpt.errors`` and ``autockpt.format.dtypes``/``tree``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, BinaryIO

import xxhash

from autockpt.errors import CorruptCheckpointError, UnsupportedValueError
from autockpt.format.dtypes import ST_DTYPES, tensor_bytes
from autockpt.format.tree import TensorEntry

FORMAT_VERSION = 1  # recorded in each payload file's metadata and in the manifest
MAX_HEADER_BYTES = 100 * 2**20  # the limit the safetensors library itself applies
_CHUNK = 64 * 2**20
_SMALL = 1 * 2**20  # tensors below this size are written in batches ...
_BATCH = 8 * 2**20  # ... of about this size



def safetensors_header(entries: list[TensorEntry]) -> tuple[bytes, dict[str, list[int]]]:
    """The header bytes (length prefix included) and each tensor's [begin, end) data offsets.

    Tensors are laid out by decreasing item size so that every tensor is aligned to its item size.
    """
    order = sorted(entries, key=lambda e: -ST_DTYPES[e.dtype][1])
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
    f: BinaryIO, entries: list[TensorEntry], on_bytes: Callable[[int], None] | None = None, checksum: bool = True,
    content_hashes: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, list[int]]]:
    """Stream ``entries`` into ``f`` as a safetensors file; returns (size, xxh3-64 hex, offsets).

    ``on_bytes(n)`` is told of every chunk written (for progress reporting). ``checksum=False`` (a pack, whose
    tensors are hashed one by one) skips the file checksum and returns "" for it. ``content_hashes``, if given,
    is filled with each tensor's xxh3-128 (name -> hex), computed from the very bytes written."""
    header, offsets = safetensors_header(entries)
    h: Any = xxhash.xxh3_64() if checksum else _NoHash()
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
        th: Any = xxhash.xxh3_128() if content_hashes is not None else _NoHash()
        if len(data) < _SMALL:
            th.update(data)
            if content_hashes is not None:
                content_hashes[entry.name] = th.hexdigest()
            pending += data
            if len(pending) >= _BATCH:
                flush()
            continue
        flush()
        for i in range(0, len(data), _CHUNK):
            chunk = data[i : i + _CHUNK]
            f.write(chunk)
            h.update(chunk)
            th.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        size += len(data)
        if content_hashes is not None:
            content_hashes[entry.name] = th.hexdigest()
    flush()
    return size, h.hexdigest(), offsets


class _NoHash:
    def update(self, data: Any) -> None:
        return None

    def hexdigest(self) -> str:
        return ""


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
            ok = dtype in ST_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(b, int) and isinstance(end, int) and 0 <= b <= end <= data_len
            ok = ok and end - b == math.prod(shape) * ST_DTYPES[dtype][1]
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

"""safetensors files: writing one from tensor entries (streamed, checksummed) and bound-checking a header.

One job: the safetensors container. Imports ``autockpt.errors`` and ``autockpt.format.dtypes``/``tree``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping
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
    content_hashes: dict[str, str] | None = None, datas: Mapping[str, memoryview] | None = None,
) -> tuple[int, str, dict[str, list[int]]]:
    """Stream ``entries`` into ``f`` as a safetensors file; returns (size, xxh3-64 hex, offsets).

    ``on_bytes(n)`` is told of every chunk written (for progress reporting). ``checksum=False`` (a pack, whose
    tensors are hashed one by one) skips the file checksum and returns "" for it. ``content_hashes``, if given,
    is filled with each tensor's xxh3-128 (name -> hex), computed from the very bytes written. ``datas`` (name ->
    bytes) supplies the bytes of tensors already viewed, so that what was hashed before is what is written.
    Small tensors are gathered into few large writes (``os.writev`` of their views on a real file: no copy)."""
    header, offsets = safetensors_header(entries)
    h: Any = xxhash.xxh3_64() if checksum else _NoHash()
    sink = _Gather(f, h, on_bytes)
    sink.add(memoryview(header))
    for entry in sorted(entries, key=lambda e: offsets[e.name][0]):
        data = datas[entry.name] if datas is not None else tensor_bytes(entry.value)
        if len(data) != entry.nbytes:
            raise UnsupportedValueError(f"tensor {entry.name!r} changed shape while it was being saved")
        if len(data) < _SMALL:
            if content_hashes is not None:
                content_hashes[entry.name] = xxhash.xxh3_128_hexdigest(data)
            sink.add(data)
            continue
        sink.flush()
        th: Any = xxhash.xxh3_128() if content_hashes is not None else _NoHash()
        for i in range(0, len(data), _CHUNK):
            chunk = data[i : i + _CHUNK]
            sink.write([chunk])
            th.update(chunk)
        if content_hashes is not None:
            content_hashes[entry.name] = th.hexdigest()
    sink.flush()
    return sink.size, h.hexdigest(), offsets


_IOV_MAX = 1024  # the fewest buffers one writev() may take on any POSIX system


class _Gather:
    """Writes buffers to ``f`` in batches of about ``_BATCH`` bytes, hashing them in order."""

    def __init__(self, f: BinaryIO, h: Any, on_bytes: Callable[[int], None] | None) -> None:
        self.f, self.h, self.on_bytes = f, h, on_bytes
        self.size = 0
        self.pending: list[memoryview] = []
        self.pending_bytes = 0
        try:  # a real file (not an object store's buffer): write the views with writev, no copy
            self.fd: int | None = f.fileno() if isinstance(f, io.BufferedWriter) else None
        except (OSError, ValueError):
            self.fd = None

    def add(self, data: memoryview) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= _BATCH or len(self.pending) >= _IOV_MAX:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.write(self.pending)
            self.pending, self.pending_bytes = [], 0

    def write(self, bufs: list[memoryview]) -> None:
        n = sum(len(b) for b in bufs)
        if self.fd is None:
            self.f.write(bufs[0] if len(bufs) == 1 else b"".join(bufs))
        else:
            self.f.flush()  # nothing buffered may follow these bytes
            done = os.writev(self.fd, bufs)
            if done < n:  # a short write (rare on a regular file): write the rest
                rest = memoryview(b"".join(bufs))[done:]
                while rest:
                    rest = rest[os.write(self.fd, rest):]
        for b in bufs:
            self.h.update(b)
        self.size += n
        if self.on_bytes is not None:
            self.on_bytes(n)


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

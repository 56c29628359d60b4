"""The on-storage format: a state tree in a JSON manifest, its tensors in a safetensors file.

A checkpoint directory holds ``tensors.safetensors`` (every tensor, named by its key path, readable with
``safetensors.safe_open``) and ``manifest.json``. The manifest is written last; it records the state tree
with every plain value, each tensor's dtype, shape and byte range, each file's size and xxh3-64 checksum,
metrics, user metadata and library versions, and a checksum of itself. Optional fields (older manifests lack
them): ``retention``, the retention policy of the manager that wrote it (``max_to_keep``,
``keep_every_n_hours``, ``keep_best``: ``{metric, mode, k}`` or null). Nothing here is ever pickled.

A deduplicated checkpoint (format version 2) keeps its tensors in shared pack files ``DIR/blobs/<name>``
(safetensors files whose tensors are named by their xxh3-128 content hash): the manifest lists the packs it
refers to under ``blobs`` ({name: {"size"}}) and each tensor names its ``blob``, its byte ``offsets`` there and
its ``xxh3_128``; every referenced byte is verified against those hashes, wherever it lies.

State tree nodes in the manifest: ``null``/``true``/``false``, integers, strings, finite floats and JSON
lists stand for themselves; every JSON object is a tagged node ``{"type": ...}``: ``tensor``, ``tuple``,
``dict`` (``items`` for string keys, ``pairs`` otherwise), ``float`` (non-finite), ``bytes``,
``stateful`` (an object saved through its ``state_dict()``) and ``per_rank`` (``ranks``: the tree of every rank's
own value, in rank order; ``autockpt.load`` reads it as a list indexed by rank).

The package: ``dtypes`` (tensor kinds and bytes), ``tree`` (state tree encoding), ``safetensors`` (the payload
container); this module is the manifest (schema, self-checksum, versions) and re-exports the names callers use.
It imports ``autockpt.errors``, ``autockpt._version`` and ``autockpt.storage.names``, never the manager.

One job: the manifest (schema, self-checksum, library versions) and the format's public names. Imports
``autockpt.errors``, ``autockpt._version``, ``autockpt.storage.names`` and the package's own modules.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any

import numpy as np
import xxhash

from autockpt._version import __version__
from autockpt.errors import CorruptCheckpointError, InvalidArgumentError
from autockpt.format.dtypes import (
    NP_TO_ST,
    ST_DTYPES,
    ST_TO_TORCH,
    TORCH_TO_ST,
    TensorMeta,
    is_stateful,
    is_tensor,
    is_torch_tensor,
    tensor_bytes,
    tensor_dtype_code,
    tensor_shape,
)
from autockpt.format.safetensors import (
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    parse_safetensors_header,
    safetensors_header,
    write_safetensors,
)
from autockpt.format.tree import TensorEntry, TreeEncoder, decode_tree, paused_gc
from autockpt.storage.names import MANIFEST_NAME, MAX_MANIFEST_BYTES, valid_file_name

TENSORS_NAME = "tensors.safetensors"
CHECKSUM = "xxh3_64"
CONTENT_HASH = "xxh3_128"  # per tensor, in deduplicated checkpoints
DEDUP_FORMAT_VERSION = 2  # a manifest whose tensors may lie in shared packs (``blobs``)



def library_versions() -> dict[str, str]:
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


@paused_gc()
def dump_manifest(body: dict[str, Any]) -> bytes:
    """Serialise a manifest: ``{"body": ..., "body_xxh3_64": ...}`` with the checksum over the body's bytes."""
    text = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    digest = xxhash.xxh3_64_hexdigest(text)
    return _PREFIX + text + f', "body_xxh3_64": "{digest}"}}\n'.encode()


@paused_gc()
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
    if body.get("format_version") not in (FORMAT_VERSION, DEDUP_FORMAT_VERSION):
        raise CorruptCheckpointError(
            f"{where}: format version {body.get('format_version')!r} is not supported by this autockpt "
            f"(it reads versions {FORMAT_VERSION} and {DEDUP_FORMAT_VERSION}); upgrade autockpt to read it"
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
    blobs = body.setdefault("blobs", {})
    if not isinstance(blobs, dict) or (blobs and body["format_version"] != DEDUP_FORMAT_VERSION):
        raise CorruptCheckpointError(f"{where}: manifest field 'blobs' is malformed")
    for name, b in blobs.items():
        if not valid_file_name(name) or not isinstance(b, dict) or not isinstance(b.get("size"), int):
            raise CorruptCheckpointError(f"{where}: manifest lists an invalid pack entry {name!r}")
    for name, t in body["tensors"].items():
        if not isinstance(t, dict):
            raise CorruptCheckpointError(f"{where}: tensor {name!r} has a malformed entry")
        if "blob" in t:
            if t["blob"] not in blobs or not isinstance(t.get(CONTENT_HASH), str):
                raise CorruptCheckpointError(f"{where}: tensor {name!r} names a pack the manifest does not list")
        elif not isinstance(t.get("file"), str) or t["file"] not in body["files"]:
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
    blobs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A manifest body; with ``blobs`` (packs: name -> {"size"}) a deduplicated one (format version 2)."""
    now = time.time()
    extra: dict[str, Any] = {} if blobs is None else {"blobs": blobs}
    return {
        "format": "autockpt",
        "format_version": FORMAT_VERSION if blobs is None else DEDUP_FORMAT_VERSION,
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
        **extra,
    }


__all__ = [
    "CHECKSUM", "CONTENT_HASH", "DEDUP_FORMAT_VERSION",
    "FORMAT_VERSION", "MANIFEST_NAME", "MAX_HEADER_BYTES", "MAX_MANIFEST_BYTES", "NP_TO_ST", "ST_DTYPES",
    "ST_TO_TORCH", "TENSORS_NAME", "TORCH_TO_ST", "TensorEntry", "TensorMeta", "TreeEncoder", "decode_tree",
    "dump_manifest", "is_stateful", "is_tensor", "is_torch_tensor", "json_plain", "library_versions", "new_manifest",
    "parse_manifest", "parse_safetensors_header", "paused_gc", "safetensors_header", "tensor_bytes",
    "tensor_dtype_code", "tensor_shape", "valid_file_name", "write_safetensors",
]

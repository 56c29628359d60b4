"""Reading a checkpoint: verify everything first, then read each tensor straight to where it belongs.

``open_checkpoint`` checks the manifest (its own checksum, its fields), that every tensor the state tree names
is listed, each payload file's size and xxh3-64 checksum (streamed in chunks: no copy of the file is held),
and that each safetensors header agrees with the manifest; a deduplicated checkpoint's tensors that lie in shared
packs (``DIR/blobs/``) are checked one by one against their xxh3-128 content hashes, so every byte a manifest
refers to is verified wherever it lies. Only then can tensors be read: into the target's
own memory when it is a contiguous host tensor of the same dtype and shape, else into a new tensor.

Imports ``autockpt.errors``, ``autockpt.format`` and ``autockpt.storage`` (and ``autockpt.dtensor`` only for
checkpoints with sharded tensors).

One job: verify and read checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from autockpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from autockpt.format import (
    CHECKSUM,
    CONTENT_HASH,
    ST_DTYPES,
    ST_TO_TORCH,
    TensorMeta,
    decode_tree,
    is_torch_tensor,
    parse_manifest,
    parse_safetensors_header,
)
from autockpt.storage import BLOBS_DIR, BlobStore, PayloadFile, Storage, open_storage, step_dirname

log = logging.getLogger("autockpt")
T = TypeVar("T")
_HASH_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclass
class Checkpoint:
    """A committed checkpoint whose files were verified. Close it (or use ``with``) when done."""

    step: int
    manifest: dict[str, Any]
    files: dict[str, tuple[PayloadFile, int]] = field(default_factory=dict)  # name -> (file, data start)
    on_bytes: Callable[[int], None] | None = None  # told of the bytes of every tensor read (progress)

    @property
    def metas(self) -> dict[str, Any]:
        metas = {n: TensorMeta(n, t["dtype"], tuple(t["shape"])) for n, t in self.manifest["tensors"].items()}
        for n, info in sharded_tensors(self.manifest).items():
            metas[n] = TensorMeta(n, info["dtype"], tuple(info["shape"]))
        return metas

    def tensor(self, name: str, like: Any = None) -> Any:
        """Read one tensor; into ``like`` itself when it is a matching contiguous host tensor.

        A tensor saved in shards by several ranks is assembled from them (or, into a sharded ``like``, only
        this rank's part is read: that is how a different world size reshards on load).
        """
        if name not in self.manifest["tensors"]:
            from autockpt.dtensor import read_sharded

            return read_sharded(self, name, sharded_tensors(self.manifest)[name], like)
        meta = self.manifest["tensors"][name]
        f, start = self.files[file_key(meta)]
        dtype, shape, (b, e) = meta["dtype"], list(meta["shape"]), meta["offsets"]
        framework = meta.get("framework", "numpy")
        into = None if framework == "numpy_scalar" else _host_bytes_of(like, dtype, shape)
        if into is not None:  # whichever framework saved it: the bytes are the same
            self._read(f, start, b, e, into)
            return like
        torch = sys.modules.get("torch")
        if framework == "torch" and torch is None:
            try:
                import torch
            except ImportError:
                torch = None
        if framework == "torch" and torch is not None:
            out = torch.empty(shape, dtype=getattr(torch, ST_TO_TORCH[dtype]))
            self._read(f, start, b, e, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            return out
        np_dtype = ST_DTYPES[dtype][0]
        if np_dtype is None:
            raise CorruptCheckpointError(f"tensor {name!r} has dtype {dtype}: install torch to load it")
        arr = cast(Any, np.empty(shape, dtype=np_dtype))
        self._read(f, start, b, e, memoryview(arr.reshape(-1).view(np.uint8)))
        return arr[()] if framework == "numpy_scalar" else arr

    def _read(self, f: Any, start: int, b: int, e: int, into: memoryview) -> None:
        if e > b:
            f.read_into(start + b, into)
            if self.on_bytes is not None:
                self.on_bytes(e - b)

    def state(self) -> dict[str, Any]:
        """The whole state as plain values and newly allocated tensors."""
        return {k: decode_tree(v, self.tensor, (k,)) for k, v in self.manifest["state"].items()}

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _host_bytes_of(like: Any, dtype: str, shape: list[int]) -> memoryview | None:
    """The writable bytes of ``like`` if it is a contiguous host tensor (torch or NumPy) of ``dtype`` and
    ``shape``, else None."""
    if isinstance(like, np.ndarray):
        fits = (like.dtype == ST_DTYPES[dtype][0] and list(like.shape) == shape and like.flags.c_contiguous
                and like.flags.writeable)
        return like.reshape(-1).view(np.uint8).data if fits else None
    if is_torch_tensor(like) and like.device.type == "cpu" and str(like.dtype) == f"torch.{ST_TO_TORCH.get(dtype)}" \
            and list(like.shape) == shape and like.is_contiguous():
        t = like.detach()
        return memoryview(t.reshape(-1).view(sys.modules["torch"].uint8).numpy())
    return None


def file_key(meta: dict[str, Any]) -> str:
    """The key of ``Checkpoint.files`` a tensor lies in: its payload file, or ``blobs/<pack>``."""
    return f"{BLOBS_DIR}/{meta['blob']}" if "blob" in meta else str(meta["file"])


def referenced_bytes(manifest: dict[str, Any]) -> int:
    """The bytes of every tensor a checkpoint refers to (its size, wherever the bytes lie)."""
    return sum(int(t["offsets"][1]) - int(t["offsets"][0]) for t in manifest["tensors"].values())


def sharded_tensors(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tensors saved in shards: name -> {"dtype", "shape" (global), "shards": [(shard name, offsets, shape)]}.

    A shard is an ordinary tensor entry with ``shard_of`` (the sharded tensor's name), ``global_shape`` and
    ``shard_offsets`` (where its first element sits in the global tensor).
    """
    out: dict[str, dict[str, Any]] = {}
    for n, t in manifest["tensors"].items():
        if "shard_of" in t:
            info = out.setdefault(t["shard_of"], {"dtype": t["dtype"], "shape": t["global_shape"], "shards": []})
            info["shards"].append((n, t["shard_offsets"], t["shape"]))
    return out


def _check_shards(manifest: dict[str, Any], where: str) -> None:
    """Every sharded tensor's shards agree on dtype and shape, lie inside it, do not overlap and cover it."""
    try:
        for name, info in sharded_tensors(manifest).items():
            shape, volume = info["shape"], 0
            boxes: list[tuple[Any, Any]] = []
            for n, off, shp in info["shards"]:
                t = manifest["tensors"][n]
                if t["dtype"] != info["dtype"] or t["global_shape"] != shape or len(off) != len(shape) \
                        or len(shp) != len(shape) or any(not isinstance(o, int) or o < 0 for o in off) \
                        or any(o + s > g for o, s, g in zip(off, shp, shape, strict=True)):
                    raise CorruptCheckpointError(f"{where}: shard {n!r} does not fit tensor {name!r}")
                for b_off, b_shp in boxes:
                    if all(max(o, bo) < min(o + s, bo + bs) for o, s, bo, bs in zip(off, shp, b_off, b_shp,
                                                                                     strict=True)):
                        raise CorruptCheckpointError(f"{where}: shards of tensor {name!r} overlap")
                boxes.append((off, shp))
                volume += math.prod(shp)
            if volume != math.prod(shape):
                raise CorruptCheckpointError(f"{where}: the shards of tensor {name!r} do not cover it: a shard is "
                                             "missing")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{where}: malformed shard entries: {e!r}") from None


def check_sizes(storage: Storage, step: int, manifest: dict[str, Any]) -> None:
    """Raise CorruptCheckpointError unless every payload file exists with its recorded size (no data read)."""
    where = f"{storage.url} {step_dirname(step)}"
    for fname, info in manifest["files"].items():
        try:
            size = storage.file_size(step, fname)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where}: {fname} is missing") from None
        if size != info["size"]:
            raise CorruptCheckpointError(f"{where}: {fname} has {size} bytes, the manifest says {info['size']}")
    blobs = BlobStore(storage) if manifest.get("blobs") else None
    for pname, info in manifest.get("blobs", {}).items():
        assert blobs is not None
        try:
            size = blobs.size(pname)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where}: pack {BLOBS_DIR}/{pname} is missing") from None
        if size != info["size"]:
            raise CorruptCheckpointError(f"{where}: pack {pname} has {size} bytes, the manifest says {info['size']}")


def read_manifest(storage: Storage, step: int) -> dict[str, Any]:
    where = f"{storage.url} {step_dirname(step)}"
    manifest = parse_manifest(storage.read_manifest(step), where)
    if manifest["step"] != step:
        raise CorruptCheckpointError(f"{where}: manifest says step {manifest['step']}")
    return manifest


def open_checkpoint(storage: Storage, step: int, manifest: dict[str, Any] | None = None) -> Checkpoint:
    """Read and verify one checkpoint; raises CorruptCheckpointError or CheckpointNotFoundError."""
    where = f"{storage.url} {step_dirname(step)}"
    if manifest is None:
        manifest = read_manifest(storage, step)
    tensors = manifest["tensors"]
    _check_shards(manifest, where)
    sharded = sharded_tensors(manifest)

    def listed(name: str, like: Any) -> None:
        if name not in tensors and name not in sharded:
            raise CorruptCheckpointError(f"{where}: the state refers to tensor {name!r} the manifest does not list")

    for key, node in manifest["state"].items():  # the whole tree is well formed (no data read), or we fail here
        decode_tree(node, listed, (key,))
    ckpt = Checkpoint(step, manifest)
    try:
        for fname, info in manifest["files"].items():
            f = storage.open_payload(step, fname, info["size"])
            ckpt.files[fname] = (f, 0)
            if f.checksum() != info[CHECKSUM]:
                raise CorruptCheckpointError(f"{where}: {fname} does not match its checksum")
            start, header = parse_safetensors_header(f.read, info["size"], f"{where}/{fname}")
            ckpt.files[fname] = (f, start)
            mine = {n: t for n, t in tensors.items() if t["file"] == fname}
            if set(header) != set(mine):
                raise CorruptCheckpointError(f"{where}: {fname} holds other tensors than the manifest lists")
            for n, t in mine.items():
                h = header[n]
                if (h["dtype"], list(h["shape"]), list(h["data_offsets"])) != (
                    t.get("dtype"), t.get("shape"), t.get("offsets")
                ):
                    raise CorruptCheckpointError(f"{where}: tensor {n!r} differs between the manifest and {fname}")
                if t.get("framework", "numpy") not in ("torch", "numpy", "numpy_scalar"):
                    raise CorruptCheckpointError(f"{where}: tensor {n!r} has an unknown framework")
        _open_packs(storage, manifest, ckpt, where)
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _open_packs(storage: Storage, manifest: dict[str, Any], ckpt: Checkpoint, where: str) -> None:
    """Open the shared packs a deduplicated checkpoint refers to (once each) and verify every referenced byte
    range: all packs' ranges are hashed by one pool, largest first, several at a time (xxhash releases the GIL)."""
    blobs = BlobStore(storage)
    checks: dict[tuple[str, str, int, int], str] = {}  # (pack, content hash, begin, end) -> a tensor there
    for pname, info in manifest.get("blobs", {}).items():
        f = blobs.open(pname, info["size"])
        key = f"{BLOBS_DIR}/{pname}"
        ckpt.files[key] = (f, 0)
        start, header = parse_safetensors_header(f.read, info["size"], f"{storage.url}/{key}")
        ckpt.files[key] = (f, start)
        spans = {tuple(h["data_offsets"]) for h in header.values()}  # pack tensors, found by where they lie
        for n, t in manifest["tensors"].items():
            if t.get("blob") != pname:
                continue
            try:
                digest, (b, e) = t[CONTENT_HASH], t["offsets"]
                nbytes = math.prod(t["shape"]) * ST_DTYPES[t["dtype"]][1]
                ok = isinstance(digest, str) and (b, e) in spans and e - b == nbytes
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise CorruptCheckpointError(f"{where}: tensor {n!r} is not where the manifest says in pack {pname}")
            if t.get("framework", "numpy") not in ("torch", "numpy", "numpy_scalar"):
                raise CorruptCheckpointError(f"{where}: tensor {n!r} has an unknown framework")
            checks.setdefault((pname, digest, b, e), n)
    if not checks:
        return
    keys = sorted(checks, key=lambda k: k[2] - k[3])  # largest first: the threads finish together

    def content_hash(k: tuple[str, str, int, int]) -> str:
        f, start = ckpt.files[f"{BLOBS_DIR}/{k[0]}"]
        return f.content_hash(start + k[2], k[3] - k[2])

    if len(keys) == 1:
        got = [content_hash(keys[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(keys)), thread_name_prefix="autockpt-verify") \
                as pool:
            got = list(pool.map(content_hash, keys))
    for ref, actual in zip(keys, got, strict=True):
        if actual != ref[1]:
            raise CorruptCheckpointError(f"{where}: tensor {checks[ref]!r} does not match its hash in pack {ref[0]}")


def newest_that_verifies(
    steps: Iterable[int], verify: Callable[[int], T], strict: bool = False
) -> tuple[int, T] | None:
    """The first of ``steps`` (give them newest first) for which ``verify(step)`` does not raise
    CorruptCheckpointError, with what it returned; None if none does.

    Each step that fails is logged as a warning naming it, and the next one is tried; with ``strict`` (a step
    the caller asked for by number) the failure is raised instead. ``verify`` returns what the caller needs
    of the checkpoint (an open ``Checkpoint``, a manifest, the state), so that it is read once.

    ```python
    from autockpt.errors import CorruptCheckpointError
    from autockpt.reader import newest_that_verifies
    def verify(step):
        if step == 3:
            raise CorruptCheckpointError("damaged")
        return f"manifest of {step}"
    assert newest_that_verifies([3, 2, 1], verify) == (2, "manifest of 2")
    ```
    """
    for step in steps:
        try:
            return step, verify(step)
        except CorruptCheckpointError as e:
            if strict:
                raise
            log.warning("autockpt: checkpoint %s does not verify, falling back to an older one: %s",
                        step_dirname(step), e)
    return None


def load(url: str | os.PathLike[str], step: int | None = None, storage_options: Mapping[str, Any] | None = None,
         local_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read a checkpoint without a model: the nested state as tensors, numpy arrays and Python values.

    Read-only: it never writes, cleans or prunes, so it is safe beside a running job. With ``step=None`` it
    reads the newest checkpoint that verifies (falling back, with a warning, past damaged ones).

    ```python
    state = autockpt.load("runs/exp1")
    weights = state["model"]          # the model's state dict, as saved
    ```
    """
    storage = open_storage(url, dict(storage_options or {}), local_dir)
    steps = [step] if step is not None else sorted(storage.scan().committed, reverse=True)

    def read_state(s: int) -> dict[str, Any]:
        copies = storage.copies(s)  # with local_dir: the local copy, then the remote one
        for copy in copies[:-1]:
            try:
                with open_checkpoint(copy, s) as ckpt:
                    return ckpt.state()
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                log.warning("autockpt: the copy of %s in %s does not verify (%s); reading %s", step_dirname(s),
                            copy.url, e, copies[-1].url)
        with open_checkpoint(copies[-1], s) as ckpt:
            return ckpt.state()

    found = newest_that_verifies(steps, read_state, strict=step is not None)
    if found is None:
        raise CheckpointNotFoundError(f"no valid checkpoint in {storage.url}")
    return found[1]

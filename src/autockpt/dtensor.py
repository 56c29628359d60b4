"""DTensors (sharded torch tensors): this rank's part of one, and reading a tensor saved in shards.

One job: the torch-side geometry of shards. Imported only where torch is in use (the reader imports it only for
a checkpoint with sharded tensors). Imports torch and ``autockpt.format``.
"""

from __future__ import annotations

from typing import Any

import torch

from autockpt.format import ST_TO_TORCH

DTensor: Any
try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: no sharded tensors
    DTensor = None


def local_box(t: Any) -> tuple[list[int], list[int]]:
    """(shape, global offsets) of this rank's part of DTensor ``t``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return [int(s) for s in shape], [int(o) for o in offsets]


def is_sharded(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor) and not all(p.is_replicate() for p in t.placements)


def _fill(ckpt: Any, shards: list[tuple[str, list[int], list[int]]], out: Any, out_off: list[int]) -> None:
    """Copy the parts of the saved shards that fall in ``out`` (whose first element is at ``out_off``)."""
    for name, s_off, s_shape in shards:
        lo = [max(a, b) for a, b in zip(out_off, s_off, strict=True)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(out_off, out.shape, s_off, s_shape, strict=True)]
        if any(a >= b for a, b in zip(lo, hi, strict=True)):
            continue
        shard = ckpt.tensor(name)
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, out_off, strict=True))
        src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, s_off, strict=True))
        out[dst] = shard[src]


def read_sharded(ckpt: Any, name: str, info: dict[str, Any], like: Any) -> Any:
    """Read a tensor saved in shards: into a DTensor ``like``, only this rank's part (any world size or mesh);
    otherwise the whole tensor (into ``like`` when it is a matching host tensor)."""
    dtype = getattr(torch, ST_TO_TORCH[info["dtype"]])
    shape = [int(s) for s in info["shape"]]
    with torch.no_grad():
        if DTensor is not None and isinstance(like, DTensor) and like.dtype == dtype and list(like.shape) == shape:
            if like.device_mesh.get_coordinate() is None:
                return like
            local = like.to_local()
            if is_sharded(like):
                lshape, loff = local_box(like)
            else:
                lshape, loff = shape, [0] * len(shape)
            region = local[tuple(slice(0, s) for s in lshape)] if list(local.shape) != lshape else local
            buf = region if region.device.type == "cpu" else torch.empty(lshape, dtype=dtype)
            _fill(ckpt, info["shards"], buf, loff)
            if buf is not region:
                region.copy_(buf)
            return like
        out = torch.empty(shape, dtype=dtype)
        _fill(ckpt, info["shards"], out, [0] * len(shape))
        return out

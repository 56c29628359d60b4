"""``torch.distributed``: checkpoints of DDP and FSDP2 / DTensor runs, one commit, every rank agreeing.

Nothing to call for the basic case: a ``CheckpointManager`` created after ``torch.distributed.init_process_group``
on every rank detects the process group and uses :class:`TorchCoordinator`. Then:

- the manager is *collective*: create it, and call ``save``, ``restore`` and ``latest_step``, on every rank,
  in the same order, with the same step;
- replicated state (plain tensors, DDP modules, replicated DTensors) is written by rank 0 alone;
- sharded state (DTensors with ``Shard`` placements, e.g. parameters and optimizer state under FSDP2
  ``fully_shard``) is written by every rank holding a shard, in parallel, into the same checkpoint
  directory (``rank-0000r.safetensors``); rank 0 writes the manifest and commits only after every rank
  reported success;
- a failure on any rank raises ``SaveError`` on every rank; a checkpoint missing a shard is never chosen;
- restoring into DTensors of another world size (or mesh) reads just each rank's part: resharding on load.

For a preemption signal that only one rank received, call :func:`any_rank` at the step boundary on every
rank: it is True everywhere if it is True anywhere, so every rank saves the same step and stops.

This module only re-exports; the coordination lives in ``autockpt.coordination.torch_dist``.

```python
# torchrun --nproc-per-node 2 train.py
import torch, torch.distributed as dist, autockpt
from autockpt.integrations.torch_distributed import any_rank
from autockpt.preemption import PreemptionWatcher
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with autockpt.CheckpointManager("/shared/ckpt", max_to_keep=3) as mgr, PreemptionWatcher() as w:
    start = mgr.restore({"model": model, "opt": opt}) or 0
    for step in range(start + 1, 101):
        opt.zero_grad(); model(torch.randn(8, 4)).sum().backward(); opt.step()
        stop = any_rank(w.triggered)
        mgr.save(step, {"model": model, "opt": opt}, force=stop)
        if stop:
            break
```

One job: keep the user-facing names of torch.distributed support importable here. Imports
``autockpt.coordination.torch_dist`` and ``autockpt.dtensor``.
"""

from __future__ import annotations

from autockpt.coordination.torch_dist import ShardEntry, TorchCoordinator, any_rank
from autockpt.dtensor import read_sharded

__all__ = ["ShardEntry", "TorchCoordinator", "any_rank", "read_sharded"]

"""autockpt: training runs that survive interruption.

```python
import autockpt
with autockpt.CheckpointManager("runs/exp1", max_to_keep=3) as mgr:
    start = mgr.restore({"model": model, "opt": opt}) or 0
    ...
    mgr.save(step, {"model": model, "opt": opt})
```

One job: the public names (``CheckpointManager``, ``resume``, ``load``, ...), re-exported. Imports
``autockpt.errors``, ``_version``, ``data``, ``loop``, ``manager``, ``per_rank``, ``reader``, ``retention`` and ``rng``.
"""

from autockpt import errors  # noqa: E402
from autockpt._version import __version__
from autockpt.data import ResumableLoader, ResumableSampler  # noqa: E402
from autockpt.loop import Run, resume  # noqa: E402
from autockpt.manager import CheckpointManager  # noqa: E402
from autockpt.per_rank import PerRank  # noqa: E402
from autockpt.reader import load  # noqa: E402
from autockpt.retention import KeepBest  # noqa: E402
from autockpt.rng import RNGState  # noqa: E402

__all__ = [
    "CheckpointManager", "KeepBest", "PerRank", "RNGState", "ResumableLoader", "ResumableSampler", "Run", "errors",
    "load", "resume", "__version__",
]

"""Which checkpoints to keep: a pure function of what is on storage, so it holds across restarts.

The kept set is the union of
- the ``max_to_keep`` newest checkpoints (all of them when ``max_to_keep`` is None), the newest always;
- with ``keep_every_n_hours=H``: the first checkpoint of every H-hour window counted from the run's start
  (recorded in every manifest), kept forever, like TF's ``keep_checkpoint_every_n_hours``;
- with ``keep_best=KeepBest(metric, mode, k)``: the ``k`` best checkpoints by ``metric`` (ties go to the
  earlier step; checkpoints without the metric, or with NaN, never count as best).

Each rule picks the same checkpoints whether it sees the whole history or only what an earlier pruning
left, so re-computing it after a restart never deletes what it kept before.

One job: which checkpoints to keep. Imports only ``autockpt.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from autockpt.errors import InvalidArgumentError


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` best checkpoints by a metric passed to ``save(..., metrics={metric: value})``.

    Example:

    ```python
    mgr = autockpt.CheckpointManager("runs/exp1", max_to_keep=3,
                                     keep_best=autockpt.KeepBest("val_loss", mode="min", k=2))
    mgr.save(step, state, metrics={"val_loss": 0.31})
    ```
    """

    metric: str
    mode: Literal["min", "max"] = "min"
    k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidArgumentError(f"KeepBest metric must be a non-empty str, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"KeepBest mode must be 'min' or 'max', got {self.mode!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidArgumentError(f"KeepBest k must be an int >= 1, got {self.k!r}")


@dataclass(frozen=True)
class CheckpointInfo:
    """What retention needs to know of one committed checkpoint."""

    step: int
    created: float  # unix time
    run_start: float  # unix time of the run's first checkpoint
    metrics: dict[str, float]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> CheckpointInfo:
        """The retention facts of a parsed manifest (numeric metrics only; ``run_start`` defaults to ``created``).

        ```python
        from autockpt.retention import CheckpointInfo
        info = CheckpointInfo.from_manifest({"step": 5, "created": 10.0, "metrics": {"loss": 0.5, "note": None}})
        assert info == CheckpointInfo(5, 10.0, 10.0, {"loss": 0.5})
        ```
        """
        m = manifest
        metrics = {k: v for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float))}
        return cls(int(m["step"]), float(m["created"]), float(m.get("run_start", m["created"])), metrics)


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention options of a :class:`~autockpt.CheckpointManager`, validated."""

    max_to_keep: int | None = 5
    keep_every_n_hours: float | None = None
    keep_best: KeepBest | None = None

    def __post_init__(self) -> None:
        m = self.max_to_keep
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise InvalidArgumentError(f"max_to_keep must be an int >= 1 or None (keep all), got {m!r}")
        h = self.keep_every_n_hours
        if h is not None and (
            isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0
        ):
            raise InvalidArgumentError(f"keep_every_n_hours must be a positive number or None, got {h!r}")
        if self.keep_best is not None and not isinstance(self.keep_best, KeepBest):
            raise InvalidArgumentError(
                f"keep_best must be an autockpt.KeepBest(metric, mode, k) or None, got {self.keep_best!r}"
            )

    def to_json(self) -> dict[str, Any]:
        """The policy as plain JSON, as recorded in every manifest (field ``retention``)."""
        kb = self.keep_best
        return {"max_to_keep": self.max_to_keep, "keep_every_n_hours": self.keep_every_n_hours,
                "keep_best": None if kb is None else {"metric": kb.metric, "mode": kb.mode, "k": kb.k}}

    @classmethod
    def from_json(cls, data: Any) -> RetentionPolicy | None:
        """The policy a manifest recorded; None if it recorded none (older manifests) or a malformed one.

        ```python
        from autockpt.retention import KeepBest, RetentionPolicy
        p = RetentionPolicy(3, None, KeepBest("val_loss", "min", 2))
        assert RetentionPolicy.from_json(p.to_json()) == p
        assert RetentionPolicy.from_json(None) is None
        ```
        """
        if not isinstance(data, Mapping):
            return None
        try:
            kb = data.get("keep_best")
            keep_best = None if kb is None else KeepBest(kb["metric"], kb["mode"], kb["k"])
            return cls(data.get("max_to_keep"), data.get("keep_every_n_hours"), keep_best)
        except (InvalidArgumentError, KeyError, TypeError):
            return None

    def reasons(self, checkpoints: Iterable[CheckpointInfo]) -> dict[int, list[str]]:
        """For every checkpoint to keep, why: 'newest', 'every-n-hours', 'best'. Absent steps may go."""
        cps = sorted(checkpoints, key=lambda c: c.step)
        why: dict[int, list[str]] = {}
        if not cps:
            return why
        recent = cps if self.max_to_keep is None else cps[-self.max_to_keep :]
        for c in recent:
            why.setdefault(c.step, []).append("newest")
        if self.keep_every_n_hours is not None:
            window = self.keep_every_n_hours * 3600.0
            start = min(c.run_start for c in cps)
            seen: set[int] = set()
            for c in cps:
                bucket = math.floor((c.created - start) / window)
                if bucket not in seen:
                    seen.add(bucket)
                    why.setdefault(c.step, []).append("every-n-hours")
        if self.keep_best is not None:
            kb = self.keep_best
            scored = [
                c for c in cps if isinstance(c.metrics.get(kb.metric), (int, float))
                and not math.isnan(c.metrics[kb.metric])
            ]
            sign = 1.0 if kb.mode == "min" else -1.0
            scored.sort(key=lambda c: (sign * c.metrics[kb.metric], c.step))
            for c in scored[: kb.k]:
                why.setdefault(c.step, []).append("best")
        return why

    def keep(self, checkpoints: Iterable[CheckpointInfo]) -> set[int]:
        return set(self.reasons(checkpoints))

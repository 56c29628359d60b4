"""Retention: each rule on its own, and a property test over random saves, restarts and crashes."""

from __future__ import annotations

import math
import os
import tempfile
import time as real_time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autockpt
import autockpt.format
import autockpt.manager
from autockpt.retention import CheckpointInfo, KeepBest, RetentionPolicy


class FakeClock:
    """Stands in for the ``time`` module inside autockpt, so hours pass instantly."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.strftime, self.gmtime, self.perf_counter = real_time.strftime, real_time.gmtime, real_time.perf_counter

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(autockpt.format, "time", c)
    monkeypatch.setattr(autockpt.manager, "time", c)
    return c


def _infos(*rows: tuple[int, float, float | None]) -> list[CheckpointInfo]:
    return [CheckpointInfo(s, h * 3600.0, 0.0, {} if m is None else {"loss": m}) for s, h, m in rows]


# ------------------------------------------------------------------------------------------ one rule each
def test_max_to_keep_keeps_the_newest() -> None:
    infos = _infos((1, 0, None), (2, 0, None), (3, 0, None), (4, 0, None))
    assert RetentionPolicy(max_to_keep=2).keep(infos) == {3, 4}
    assert RetentionPolicy(max_to_keep=None).keep(infos) == {1, 2, 3, 4}


def test_keep_every_n_hours_keeps_the_first_of_each_window() -> None:
    infos = _infos((1, 0.0, None), (2, 0.5, None), (3, 1.2, None), (4, 1.9, None), (5, 2.1, None), (6, 2.2, None))
    assert RetentionPolicy(max_to_keep=1, keep_every_n_hours=1).keep(infos) == {1, 3, 5, 6}


def test_keep_best_min_max_ties_and_missing() -> None:
    infos = _infos((1, 0, 0.5), (2, 0, 0.2), (3, 0, None), (4, 0, 0.2), (5, 0, float("nan")), (6, 0, 0.9))
    assert RetentionPolicy(max_to_keep=1, keep_best=KeepBest("loss", "min", 2)).keep(infos) == {2, 4, 6}
    assert RetentionPolicy(max_to_keep=1, keep_best=KeepBest("loss", "min", 1)).keep(infos) == {2, 6}
    assert RetentionPolicy(max_to_keep=1, keep_best=KeepBest("loss", "max", 1)).keep(infos) == {6}
    assert RetentionPolicy(max_to_keep=1, keep_best=KeepBest("acc", "max", 1)).keep(infos) == {6}


def test_reasons_say_why() -> None:
    infos = _infos((1, 0, 0.1), (2, 3, 0.5), (3, 3.1, 0.9))
    why = RetentionPolicy(max_to_keep=1, keep_every_n_hours=2, keep_best=KeepBest("loss")).reasons(infos)
    assert why == {1: ["every-n-hours", "best"], 2: ["every-n-hours"], 3: ["newest"]}


def test_every_n_hours_clock_continues_across_restarts(tmp_path: Any, clock: FakeClock) -> None:
    for step in range(1, 9):  # one save every 40 minutes, a restart before each
        with autockpt.CheckpointManager(tmp_path, max_to_keep=2, keep_every_n_hours=2) as mgr:
            mgr.save(step, {"w": np.full(2, step)})
        clock.now += 40 * 60
    # windows of 2 h from the first save: [0,2h) first = step 1 (t=0), [2h,4h) first = step 4 (t=2h), [4h,..) = step 7
    assert autockpt.CheckpointManager(tmp_path).all_steps() == [1, 4, 7, 8]


# ------------------------------------------------------------------------------------------ property test
@dataclass
class Saved:
    step: int
    created: float
    metric: float | None


def _reference(history: list[Saved], policy: RetentionPolicy) -> set[int]:
    """The policy's rules written out over the whole history (what an oracle that never deleted would keep)."""
    by_step = sorted(history, key=lambda s: s.step)
    keep = {s.step for s in (by_step if policy.max_to_keep is None else by_step[-policy.max_to_keep :])}
    if policy.keep_every_n_hours is not None and by_step:
        t0, seen = by_step[0].created, set()
        for s in by_step:
            b = math.floor((s.created - t0) / (policy.keep_every_n_hours * 3600))
            if b not in seen:
                seen.add(b)
                keep.add(s.step)
    kb = policy.keep_best
    if kb is not None:
        scored = [s for s in by_step if s.metric is not None]
        scored.sort(key=lambda s: ((s.metric if kb.mode == "min" else -s.metric), s.step))  # type: ignore[operator]
        keep |= {s.step for s in scored[: kb.k]}
    return keep


save_op = st.tuples(st.just("save"), st.floats(0, 3), st.one_of(st.none(), st.floats(-5, 5)))
op = st.one_of(
    save_op, save_op, save_op,
    st.tuples(st.just("restart"), st.just(0.0), st.none()),
    st.tuples(st.just("crash_write"), st.floats(0, 3), st.none()),
    st.tuples(st.just("crash_prune"), st.floats(0, 3), st.one_of(st.none(), st.floats(-5, 5))),
)
policies = st.builds(
    RetentionPolicy,
    max_to_keep=st.sampled_from([1, 2, 3, None]),
    keep_every_n_hours=st.sampled_from([None, 1.0, 2.5]),
    keep_best=st.one_of(st.none(), st.builds(KeepBest, st.just("m"), st.sampled_from(["min", "max"]),
                                             st.integers(1, 2))),
)


class _CrashBeforePrune(Exception):
    pass


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=policies, ops=st.lists(op, min_size=1, max_size=25))
def test_kept_set_always_equals_the_policy(policy: RetentionPolicy, ops: list[tuple[str, float, Any]],
                                           clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"max_to_keep": policy.max_to_keep, "keep_every_n_hours": policy.keep_every_n_hours,
              "keep_best": policy.keep_best}
    with tempfile.TemporaryDirectory() as d:
        mgr = autockpt.CheckpointManager(d, **kwargs)
        history: list[Saved] = []
        step = 0
        for kind, hours, metric in ops:
            clock.now += hours * 3600
            if kind == "restart":
                mgr = autockpt.CheckpointManager(d, **kwargs)
                kept = set(mgr.all_steps())
                assert _reference(history, policy) <= kept <= {s.step for s in history}
                continue
            step += 1
            metrics = {} if metric is None else {"m": metric}
            if kind == "crash_write":  # what a kill during the payload write leaves behind, then a restart
                leftover = os.path.join(d, f".tmp-step_{step:010d}-0000beef")
                os.makedirs(leftover)
                with open(os.path.join(leftover, "tensors.safetensors"), "wb") as f:
                    f.write(b"\x00" * 100)
                mgr = autockpt.CheckpointManager(d, **kwargs)
                assert not os.path.exists(leftover)
            elif kind == "crash_prune":  # committed, then the process died before pruning
                def die(self: Any, *args: Any) -> None:
                    raise _CrashBeforePrune
                with monkeypatch.context() as m:
                    m.setattr(autockpt.CheckpointManager, "_prune", die)
                    with pytest.raises(_CrashBeforePrune):
                        mgr.save(step, {"w": np.full(2, step)}, metrics=metrics)
                history.append(Saved(step, clock.now, metric))
                mgr = autockpt.CheckpointManager(d, **kwargs)
                assert _reference(history, policy) <= set(mgr.all_steps())
            else:
                assert mgr.save(step, {"w": np.full(2, step)}, metrics=metrics)
                history.append(Saved(step, clock.now, metric))
                assert set(mgr.all_steps()) == _reference(history, policy)
                assert mgr.latest_step == step
                assert autockpt.load(d)["w"].tolist() == [step, step]

"""Checkpoints written by an earlier autockpt (tests/fixtures/v1, made by make_fixture.py) still restore."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import autockpt

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", ["single", "sharded"])
def test_v1_checkpoint_restores_in_place(name: str, tmp_path: Path) -> None:
    exp = EXPECTED[name]
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    assert sorted(p.name for p in (run / "step_0000000007").iterdir()) == exp["files"]
    torch.manual_seed(99)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # creates the optimizer state that the restore overwrites
    plain: dict = {}
    state = {"model": model, "opt": opt, "rng": autockpt.RNGState(), "plain": plain,
             "arr": np.zeros((2, 3), np.int16)}
    with autockpt.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [7]
        assert mgr.latest_step == 7
        assert mgr.restore(state) == 7
    draws = {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(3).tolist()}
    assert draws == exp["draws_after_restore"]
    assert model.weight.detach().tolist() == exp["weight"]
    assert model.bias.detach().tolist() == exp["bias"]
    osd = opt.state_dict()["state"]
    assert [osd[i]["exp_avg"].tolist() for i in (0, 1)] == exp["exp_avg"]
    assert [osd[i]["exp_avg_sq"].tolist() for i in (0, 1)] == exp["exp_avg_sq"]
    assert [float(osd[i]["step"]) for i in (0, 1)] == exp["opt_step"]
    assert state["arr"].tolist() == exp["arr"]
    got = state["plain"]
    assert {k: v for k, v in got.items() if k != "nan"} == {
        "epoch": 2, "name": "v1", "lr": 0.25, "flags": [True, None], "pair": (1, "a"), "blob": b"\x00\x01",
        "ints": {3: "three"}}
    assert math.isnan(got["nan"])


@pytest.mark.parametrize("name", ["single", "sharded"])
def test_v1_checkpoint_loads_without_a_model(name: str) -> None:
    exp = EXPECTED[name]
    loaded = autockpt.load(FIXTURES / name)  # read-only: reads the fixture in place
    assert loaded["model"]["weight"].tolist() == exp["weight"]
    assert loaded["model"]["bias"].tolist() == exp["bias"]
    assert loaded["plain"]["ints"] == {3: "three"}
    assert loaded["arr"].tolist() == exp["arr"]


def test_v1_rng_restores_into_a_per_rank_target(tmp_path: Path) -> None:
    """A checkpoint with one plain RNGState (before autockpt.PerRank) restores into a PerRank target."""
    exp = EXPECTED["single"]
    run = tmp_path / "single"
    shutil.copytree(FIXTURES / "single", run)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    rng = autockpt.PerRank(autockpt.RNGState())
    state = {"model": model, "opt": opt, "rng": rng, "plain": {}, "arr": np.zeros((2, 3), np.int16)}
    with autockpt.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.restore(state) == 7
    draws = {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(3).tolist()}
    assert draws == exp["draws_after_restore"]
    assert state["rng"] is rng and state["plain"]["epoch"] == 2

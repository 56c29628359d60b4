"""The on-storage format: round trips, safetensors compatibility, and no pickle anywhere."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import autockpt
from autockpt.errors import CorruptCheckpointError, UnsupportedValueError
from autockpt.format import dump_manifest, parse_manifest


def test_round_trip_of_every_value_kind(tmp_path: Path) -> None:
    state = {
        "tensors": {
            "f32": torch.randn(3, 4),
            "bf16": torch.randn(5).to(torch.bfloat16),
            "f16": torch.randn(2, 2).half(),
            "i64": torch.arange(7),
            "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 3),
            "noncontig": torch.randn(4, 6).t(),
        },
        "np": {
            "a": np.arange(10, dtype=np.int32).reshape(2, 5),
            "scalar": np.float64(2.25),
            "c": np.ones(3, np.complex64),
        },
        "plain": {
            "int": 12345678901234567890,
            "float": 0.1,
            "nan": float("nan"),
            "inf": float("-inf"),
            "str": "héllo/../x",
            "none": None,
            "bool": True,
            "list": [1, [2, 3], {"x": 4}],
            "tuple": (1, (2.0, "a")),
            "bytes": b"\x00\xff",
            "intkeys": {0: "a", 1: {"b": 2}, (1, 2): None},
            "typekey": {"type": "tensor", "name": "not-a-tensor"},
        },
    }
    with autockpt.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.save(1, state)
    out = autockpt.load(tmp_path / "run")
    for k, v in state["tensors"].items():
        assert isinstance(out["tensors"][k], torch.Tensor)
        assert out["tensors"][k].dtype == v.dtype and torch.equal(out["tensors"][k], v), k
    assert isinstance(out["np"]["a"], np.ndarray) and np.array_equal(out["np"]["a"], state["np"]["a"])
    assert out["np"]["scalar"] == 2.25 and isinstance(out["np"]["scalar"], np.float64)
    assert out["np"]["c"].dtype == np.complex64
    p = out["plain"]
    assert math.isnan(p.pop("nan")) and p.pop("inf") == float("-inf")
    expected = dict(state["plain"])
    del expected["nan"], expected["inf"]
    assert p == expected
    assert isinstance(p["tuple"], tuple) and isinstance(p["tuple"][1], tuple)


def test_files_are_plain_safetensors_and_json(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with autockpt.CheckpointManager(tmp_path, dedup=False) as mgr:
        mgr.save(7, {"model": model, "epoch": 2}, metrics={"loss": 0.5}, metadata={"run": "a"})
    d = tmp_path / "step_0000000007"
    assert sorted(os.listdir(d)) == ["manifest.json", "tensors.safetensors"]
    with safe_open(str(d / "tensors.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"model/weight", "model/bias"}
        assert torch.equal(f.get_tensor("model/weight"), model.weight.detach())
    doc = json.loads((d / "manifest.json").read_text())  # the whole manifest is valid JSON
    body = doc["body"]
    assert body["step"] == 7 and body["metrics"] == {"loss": 0.5} and body["metadata"] == {"run": "a"}
    assert body["tensors"]["model/weight"]["shape"] == [2, 3]
    assert body["files"]["tensors.safetensors"]["size"] == (d / "tensors.safetensors").stat().st_size
    assert body["versions"]["torch"] == torch.__version__
    assert body["state"]["epoch"] == 2


def test_no_pickle_is_written_or_read(tmp_path: Path) -> None:
    """Save and restore with torch.load and every pickle loader replaced by a trap, in a fresh process."""
    script = f"""
import os, pickle, torch, torch._dynamo, autockpt
def trap(*a, **k): raise AssertionError("pickle or torch.load was called")
class TrapUnpickler(pickle.Unpickler):
    def __init__(self, *a, **k): trap()
pickle.load = pickle.loads = trap
pickle.Unpickler = TrapUnpickler
torch.load = trap
assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
m = torch.nn.Linear(4, 4); opt = torch.optim.Adam(m.parameters())
m(torch.randn(2, 4)).sum().backward(); opt.step()
state = {{"model": m, "opt": opt, "rng": autockpt.RNGState(), "x": {{1: (2, "3")}}}}
mgr = autockpt.CheckpointManager({str(tmp_path)!r})
mgr.save(1, state)
m2 = torch.nn.Linear(4, 4); opt2 = torch.optim.Adam(m2.parameters())
assert mgr.restore({{"model": m2, "opt": opt2, "rng": autockpt.RNGState(), "x": None}}) == 1
assert torch.equal(m.weight, m2.weight)
print("ok")
"""
    env = dict(os.environ, TORCH_FORCE_WEIGHTS_ONLY_LOAD="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    for f in tmp_path.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"\x80\x04\x95" not in data and b"\x80\x02" not in data[:2], f"pickle opcode in {f}"


def test_unsupported_value_names_the_key(tmp_path: Path) -> None:
    mgr = autockpt.CheckpointManager(tmp_path)
    with pytest.raises(UnsupportedValueError, match=r"extra/cfg/fn"):
        mgr.save(1, {"extra": {"cfg": {"fn": lambda x: x}}})
    with pytest.raises(UnsupportedValueError, match="dict key"):
        mgr.save(1, {"extra": {object(): 1}})
    assert mgr.all_steps() == []  # nothing half-written became a checkpoint
    assert os.listdir(tmp_path) == []


def test_manifest_self_checksum_detects_any_change() -> None:
    raw = dump_manifest({"format": "autockpt", "format_version": 1, "step": 3, "created": 1.0,
                         "state": {}, "tensors": {}, "files": {}})
    assert parse_manifest(raw, "x")["step"] == 3
    changed = raw.replace(b'"step":3', b'"step":4')
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        parse_manifest(changed, "x")
    with pytest.raises(CorruptCheckpointError):
        parse_manifest(pickle.dumps({"a": 1}), "x")


def test_import_autockpt_imports_no_framework() -> None:
    code = "import sys, autockpt; print(sorted(m for m in ('torch','keras','lightning','s3fs') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("dedup", [True, False])
def test_many_small_tensors_of_every_kind_round_trip_and_the_collector_is_left_on(
        tmp_path: Path, dedup: bool, seed: int) -> None:
    """The small-tensor fast paths (byte views without torch checks, writev of gathered views, the collector paused
    while the tree and manifest are made) write exactly the bytes of every kind of tensor,
    and leave the garbage collector as they found it."""
    import gc

    import safetensors.torch

    g = torch.Generator().manual_seed(seed)
    state: dict[str, object] = {}
    for i in range(3000):  # flat, as a state dict with many entries is
        base = torch.randn(3, 5, generator=g)
        state[f"t{i}"] = [base, base.t(), torch._neg_view(base), base.to(torch.bfloat16), base[0, 0],
                          torch.zeros(0), torch.nn.Parameter(base.clone()), torch.complex(base, -base).conj(),
                          base.numpy().T, np.float32(i)][i % 10]
    big = torch.randn(2**19, generator=g)  # 2 MiB: written on its own, not gathered
    state["big"] = big
    assert gc.isenabled()
    with autockpt.CheckpointManager(tmp_path / "run", dedup=dedup) as mgr:
        mgr.save(1, state)
        assert gc.isenabled(), f"seed {seed}"
        with pytest.raises(UnsupportedValueError):
            mgr.save(2, {**state, "bad": object()})
        assert gc.isenabled(), f"seed {seed}: a failed save left the collector off"
    loaded = autockpt.load(tmp_path / "run")
    for k, v in state.items():
        want = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v.detach().resolve_conj()
        got = torch.as_tensor(np.asarray(loaded[k])) if not isinstance(loaded[k], torch.Tensor) else loaded[k]
        assert got.dtype == want.dtype and got.shape == want.shape, f"seed {seed}: {k}"
        assert torch.equal(got.resolve_neg(), want.resolve_neg()), f"seed {seed}: {k} differs"
    if not dedup:  # still a plain safetensors file
        plain = safetensors.torch.load_file(str(next((tmp_path / "run").glob("step_*/*.safetensors"))))
        assert torch.equal(plain["big"], big), f"seed {seed}"

"""Deduplicated checkpoints (issue 14): unchanged tensors are not written again, shared packs are verified and
collected safely (mark-and-sweep), and every kept checkpoint restores exactly after saves, prunes, restarts and
kills, on local disks, in memory and on S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autockpt
from autockpt.cli import main as cli_main
from autockpt.collect import referenced_packs
from autockpt.reader import open_checkpoint, read_manifest
from autockpt.storage import BlobStore, open_storage

FULL = os.environ.get("AUTOCKPT_FULL") == "1"


def _frozen_backbone(seed: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    for p in backbone.parameters():
        p.requires_grad_(False)
    head = torch.nn.Linear(256, 3)
    return backbone, head, torch.optim.Adam(head.parameters(), lr=0.01)


def _train(backbone: torch.nn.Module, head: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        head(backbone(torch.randn(4, 64))).pow(2).mean().backward()
        opt.step()


def _new_packs(storage: Any, step: int) -> dict[str, Any]:
    """The tensors of ``step`` that its own save wrote (their pack is new), by name."""
    m = read_manifest(storage, step)
    return {n: t for n, t in m["tensors"].items() if t["blob"].startswith(f"step_{step:010d}-")}


def _assert_no_garbage(storage: Any, where: str) -> None:
    manifests = [read_manifest(storage, s) for s in storage.scan().committed]
    packs = BlobStore(storage).packs()
    assert set(packs) == referenced_packs(manifests), f"{where}: packs {sorted(packs)} vs referenced"
    assert not BlobStore(storage).leftovers(), where


def test_frozen_backbone_saves_write_only_the_trainable_tensors_and_optimizer_state(
        storage: tuple[str, dict[str, Any]]) -> None:
    url, opts = storage
    backbone, head, opt = _frozen_backbone(0)
    state = {"backbone": backbone, "head": head, "opt": opt}
    with autockpt.CheckpointManager(url, max_to_keep=2, storage_options=opts) as mgr:
        for step in (2, 4, 6, 8):
            _train(backbone, head, opt, 2)
            assert mgr.save(step, state)
    s = open_storage(url, opts)
    assert sorted(s.scan().committed) == [6, 8]
    trainable = {f"head/{n}" for n, _ in head.named_parameters()}
    for step in (6, 8):
        written = set(_new_packs(s, step))
        assert {n for n in written if not n.startswith("opt/")} == trainable, (step, sorted(written))
        assert any(n.startswith("opt/state/") for n in written), step
        m = read_manifest(s, step)
        assert all(m["tensors"][f"backbone/{n}"]["blob"].startswith("step_0000000002-")
                   for n in backbone.state_dict()), "the backbone is shared with the first save"
    # the packs of steps 4 and 6's predecessors that nothing refers to any more were collected
    _assert_no_garbage(s, url)
    # restore returns the exact values of the newest save, into fresh objects
    b2, h2, o2 = _frozen_backbone(1)
    assert autockpt.CheckpointManager(url, storage_options=opts).restore({"backbone": b2, "head": h2, "opt": o2}) == 8
    for a, b in ((backbone, b2), (head, h2)):
        for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), n
    assert str(o2.state_dict()) == str(opt.state_dict())


def test_lora_fine_tune_writes_only_adapters_and_optimizer_state(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    state = {"model": model, "opt": opt}
    with autockpt.CheckpointManager(tmp_path, max_to_keep=3) as mgr:
        for step in (1, 2, 3):
            ids = torch.randint(0, 128, (2, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, state)
    s = open_storage(str(tmp_path))
    trainable = {f"model/{n}" for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for step in (2, 3):
        written = set(_new_packs(s, step))
        assert {n for n in written if n.startswith("model/")} == trainable, sorted(written)[:5]
        assert {n for n in written if not n.startswith("model/")} <= {
            n for n in read_manifest(s, step)["tensors"] if n.startswith("opt/")}
    fresh = autockpt.load(str(tmp_path))
    for n, p in model.state_dict().items():
        assert torch.equal(fresh["model"][n], p), n


def test_verify_checks_the_shared_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backbone, head, opt = _frozen_backbone(0)
    state = {"backbone": backbone, "head": head, "opt": opt}
    with autockpt.CheckpointManager(tmp_path, max_to_keep=None) as mgr:
        for step in (1, 2, 3):
            _train(backbone, head, opt, 1)
            mgr.save(step, state)
    assert cli_main(["verify", str(tmp_path), "--all"]) == 0
    assert cli_main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ADDED" in out and "shared pack" in out
    s = open_storage(str(tmp_path))
    first = next(p for p in BlobStore(s).packs() if p.startswith("step_0000000001-"))
    # flip one byte inside the backbone's bytes in the first save's pack: every checkpoint shares them
    m = read_manifest(s, 3)
    b, _ = m["tensors"]["backbone/2.weight"]["offsets"]
    with open(tmp_path / "blobs" / first, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header + b + 5)
        byte = f.read(1)
        f.seek(8 + header + b + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cli_main(["verify", str(tmp_path), "--all"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED") == 3 and "backbone/2.weight" in out, out
    b2, h2, o2 = _frozen_backbone(1)
    before = b2.state_dict()["2.weight"].clone()
    assert autockpt.CheckpointManager(tmp_path).restore({"backbone": b2, "head": h2, "opt": o2}) is None
    assert torch.equal(b2.state_dict()["2.weight"], before), "nothing is copied from a damaged checkpoint"


def test_materialize_and_export_give_self_contained_copies(tmp_path: Path) -> None:
    backbone, head, opt = _frozen_backbone(0)
    state = {"backbone": backbone, "head": head, "opt": opt}
    with autockpt.CheckpointManager(tmp_path / "run") as mgr:
        for step in (1, 2):
            _train(backbone, head, opt, 1)
            mgr.save(step, state)
    assert cli_main(["materialize", str(tmp_path / "run"), "--step", "2", "--to", str(tmp_path / "copy")]) == 0
    assert sorted(os.listdir(tmp_path / "copy")) == ["step_0000000002"]
    assert sorted(os.listdir(tmp_path / "copy" / "step_0000000002")) == ["manifest.json", "tensors.safetensors"]
    b2, h2, o2 = _frozen_backbone(1)
    assert autockpt.CheckpointManager(tmp_path / "copy").restore({"backbone": b2, "head": h2, "opt": o2}) == 2
    assert all(torch.equal(x, y) for x, y in zip(head.state_dict().values(), h2.state_dict().values(), strict=True))
    assert str(o2.state_dict()) == str(opt.state_dict())
    assert cli_main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "w.safetensors")]) == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["backbone.2.weight"], backbone[2].weight)


def test_dedup_false_writes_self_contained_checkpoints_and_both_kinds_mix(tmp_path: Path) -> None:
    backbone, head, opt = _frozen_backbone(0)
    state = {"backbone": backbone, "head": head, "opt": opt}
    with autockpt.CheckpointManager(tmp_path, dedup=False) as mgr:
        mgr.save(1, state)
    assert not (tmp_path / "blobs").exists()
    assert sorted(os.listdir(tmp_path / "step_0000000001")) == ["manifest.json", "tensors.safetensors"]
    with autockpt.CheckpointManager(tmp_path, max_to_keep=1) as mgr:  # dedup on over an old directory
        _train(backbone, head, opt, 1)
        mgr.save(2, state)
    with autockpt.CheckpointManager(tmp_path, max_to_keep=1, dedup=False) as mgr:  # and off again: packs go
        _train(backbone, head, opt, 1)
        mgr.save(3, state)
    assert BlobStore(open_storage(str(tmp_path))).packs() == {}
    assert torch.equal(autockpt.load(str(tmp_path))["head"]["weight"], head.weight)
    with pytest.raises(autockpt.errors.InvalidArgumentError, match="dedup must be True or False"):
        autockpt.CheckpointManager(tmp_path, dedup="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ kills

_CHILD = textwrap.dedent("""
    import logging, os, signal, sys, torch, autockpt
    url, mode, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    class KillOnCollect(logging.Handler):   # a real SIGKILL in the middle of a collection
        def emit(self, record):
            if "collected unreferenced pack" in record.getMessage():
                os.kill(os.getpid(), signal.SIGKILL)
    log = logging.getLogger("autockpt"); log.setLevel(logging.DEBUG)
    if mode == "collect":
        log.addHandler(KillOnCollect())
    torch.manual_seed(0)
    frozen = torch.randn(256, 256)
    keep = None if mode == "fill" else 1
    with autockpt.CheckpointManager(url, max_to_keep=keep) as mgr:
        for step in range(first, first + (4 if mode == "fill" else 1000)):
            mgr.save(step, {"frozen": frozen, "w": torch.full((64,), float(step)), "step": step})
            print(step, flush=True)
""")


def _check_run(url: str, where: str) -> None:
    """Every kept checkpoint verifies and restores its own values; a clean start leaves no garbage."""
    autockpt.CheckpointManager(url).close()  # a clean start finishes any interrupted collection
    s = open_storage(url)
    torch.manual_seed(0)
    frozen = torch.randn(256, 256)
    assert s.scan().committed, where
    for step in s.scan().committed:
        open_checkpoint(s, step).close()
        got = autockpt.load(url, step=step)
        assert got["step"] == step and torch.equal(got["w"], torch.full((64,), float(step))), (where, step)
        assert torch.equal(got["frozen"], frozen), (where, step)
    _assert_no_garbage(s, where)


def test_sigkill_during_a_collection_loses_nothing_and_leaves_no_garbage(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(autockpt.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _CHILD, url, "fill", "1"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(BlobStore(open_storage(url)).packs()) == 4
    killed = subprocess.run([sys.executable, "-c", _CHILD, url, "collect", "10"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    s = open_storage(url)
    assert 10 in s.scan().committed
    assert len(BlobStore(s).packs()) > len(referenced_packs([read_manifest(s, x) for x in s.scan().committed])), \
        "the kill came in the middle of the sweep"
    _check_run(url, "after a SIGKILL during collection")


def test_sigkill_at_random_moments_of_saves_prunes_and_collections(tmp_path: Path, seed: int) -> None:
    import random

    rng = random.Random(seed)
    url = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(autockpt.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    first = 1
    for trial in range(12 if FULL else 3):
        p = subprocess.Popen([sys.executable, "-c", _CHILD, url, "loop", str(first)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout is not None
        for _ in range(rng.randint(1, 4)):  # a few saves committed, then a kill at a random moment
            p.stdout.readline()
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        _check_run(url, f"seed {seed}, trial {trial}")
        first = max(open_storage(url).scan().committed) + 1


# ------------------------------------------------------------------------------------------------ random programs

_OPS = st.lists(st.one_of(
    st.tuples(st.just("save"), st.lists(st.booleans(), min_size=3, max_size=3)),  # which tensors change
    st.tuples(st.just("restart"), st.integers(1, 3)),  # a new manager with max_to_keep=k (prunes at next save)
    st.tuples(st.just("crash"), st.integers(0, 2)),  # leftovers of a save killed before its manifest
    st.tuples(st.just("prune"), st.integers(1, 2)),  # `autockpt prune` offline (collects too)
), min_size=1, max_size=10)


def _random_program(url: str, opts: dict[str, Any], ops: list[tuple[str, Any]]) -> None:
    tensors = [torch.arange(n, dtype=torch.float32) for n in (4096, 512, 7)]
    saved: dict[int, list[torch.Tensor]] = {}
    step = 0
    mgr = autockpt.CheckpointManager(url, max_to_keep=2, storage_options=opts)
    for i, (op, arg) in enumerate(ops):
        if op == "save":
            step += 1
            tensors = [t + 1 if change else t for t, change in zip(tensors, arg, strict=True)]
            mgr.save(step, {"t": tensors, "n": step})
            saved[step] = [t.clone() for t in tensors]
        elif op == "restart":
            mgr.close()
            mgr = autockpt.CheckpointManager(url, max_to_keep=arg, storage_options=opts)
        elif op == "crash":  # what a SIGKILL after writing a pack, before the manifest, leaves behind
            mgr.close()
            blobs = BlobStore(open_storage(url, opts))
            blobs.write(f"step_{step + 1:010d}-dead{i:08x}-001.safetensors", lambda f, n=arg: f.write(b"\0" * (n + 9)))
            mgr = autockpt.CheckpointManager(url, max_to_keep=2, storage_options=opts)
        elif step:  # prune needs a directory
            mgr.close()
            argv = ["prune", url, "--max-to-keep", str(arg)] + (["--storage-options", json.dumps(opts)] if opts else [])
            assert cli_main(argv) == 0
            mgr = autockpt.CheckpointManager(url, max_to_keep=2, storage_options=opts)
        s = open_storage(url, opts)
        for k in s.scan().committed:  # every kept checkpoint verifies and restores exactly
            got = autockpt.load(url, step=k, storage_options=opts)
            assert got["n"] == k and all(torch.equal(a, b) for a, b in zip(got["t"], saved[k], strict=True)), \
                (ops, i, k)
    mgr.close()
    mgr = autockpt.CheckpointManager(url, storage_options=opts)  # a clean start
    mgr.close()
    _assert_no_garbage(open_storage(url, opts), f"{url} after {ops}")


@settings(max_examples=40 if FULL else 12, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=_OPS)
def test_random_saves_prunes_crashes_keep_every_checkpoint_and_leave_no_garbage(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, Any]]) -> None:
    _random_program(str(tmp_path_factory.mktemp("h") / "run"), {}, ops)


@settings(max_examples=10 if FULL else 3, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=_OPS)
def test_random_programs_on_s3(s3_server: Any, ops: list[tuple[str, Any]]) -> None:
    _random_program(f"s3://{s3_server.new_bucket()}/run", s3_server.storage_options, ops)


@pytest.mark.parametrize("field,value", [
    ("shape", "x"), ("shape", [3]), ("offsets", [0]), ("offsets", [0, 4]), ("xxh3_128", "0" * 32),
    ("blob", "other.safetensors"), ("blob", "../x.safetensors"), ("dtype", "??"), ("framework", "pickle"),
])
def test_a_tampered_deduplicated_manifest_is_refused_as_corrupt(tmp_path: Path, field: str, value: Any) -> None:
    from autockpt.format import dump_manifest
    from autockpt.storage.names import MANIFEST_NAME

    with autockpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.arange(6, dtype=torch.float32), "v": torch.ones(3)})
    s = open_storage(str(tmp_path))
    m = read_manifest(s, 1)
    m["tensors"]["w"][field] = value
    (tmp_path / "step_0000000001" / MANIFEST_NAME).write_bytes(dump_manifest(m))
    with pytest.raises(autockpt.errors.CorruptCheckpointError):
        open_checkpoint(s, 1).close()
    assert autockpt.CheckpointManager(tmp_path).restore({"w": torch.zeros(6), "v": torch.zeros(3)}) is None


def test_async_saves_deduplicate_and_collect_in_the_background(tmp_path: Path) -> None:
    backbone, head, opt = _frozen_backbone(0)
    state = {"backbone": backbone, "head": head, "opt": opt}
    with autockpt.CheckpointManager(tmp_path, max_to_keep=1, async_save=True) as mgr:
        for step in (1, 2, 3):
            _train(backbone, head, opt, 1)
            assert mgr.save(step, state)
    s = open_storage(str(tmp_path))
    assert sorted(s.scan().committed) == [3]
    assert {n for n in _new_packs(s, 3) if not n.startswith("opt/")} == {"head/weight", "head/bias"}
    _assert_no_garbage(s, "async")
    got = autockpt.load(str(tmp_path))
    assert torch.equal(got["head"]["weight"], head.weight)
    assert torch.equal(got["backbone"]["2.weight"], backbone[2].weight)


def _change_data_inplace(p: torch.nn.Parameter) -> None:
    p.data.add_(1.0)  # through .data: the parameter's version counter does not move


def _change_copy_no_grad(p: torch.nn.Parameter) -> None:
    with torch.no_grad():
        p.copy_(p + 1.0)


def _change_rebind_data(p: torch.nn.Parameter) -> None:
    p.data = p.data + 1.0  # new storage, same shape and dtype


def _change_numpy_view(p: torch.nn.Parameter) -> None:
    p.detach().numpy()[...] += 1.0  # a NumPy view: torch sees no write at all


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("change", [_change_data_inplace, _change_copy_no_grad, _change_rebind_data,
                                    _change_numpy_view])
def test_a_frozen_tensor_changed_behind_autograds_back_is_saved_again(
        tmp_path: Path, change: Any, async_save: bool, seed: int) -> None:
    """A requires_grad=False parameter that changed in place (however: .data, copy_ under no_grad, a new .data,
    a NumPy view) between two saves is written again, and restore returns the new bytes: deduplication never
    trusts anything but the bytes (no cache of content hashes keyed on version counters or addresses)."""
    torch.manual_seed(seed)
    frozen = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    other = torch.randn(64, 64)
    url = str(tmp_path / "run")
    with autockpt.CheckpointManager(url, dedup=True, async_save=async_save) as mgr:
        mgr.save(1, {"frozen": frozen, "other": other})
        mgr.save(2, {"frozen": frozen, "other": other})  # unchanged: shared
        before = frozen.detach().clone()
        change(frozen)
        assert not torch.equal(frozen.detach(), before)
        expected = frozen.detach().clone()
        mgr.save(3, {"frozen": frozen, "other": other})
    storage = open_storage(url)
    assert "frozen" in _new_packs(storage, 3), f"seed {seed}: the changed tensor was not written again"
    assert "frozen" not in _new_packs(storage, 2), f"seed {seed}: the unchanged tensor was written again"
    target = {"frozen": torch.zeros(64, 64), "other": torch.zeros(64, 64)}
    autockpt.CheckpointManager(url).restore(target)
    assert torch.equal(target["frozen"], expected), f"seed {seed}: restore did not return the new bytes"
    assert torch.equal(target["other"], other), f"seed {seed}"


def test_an_async_save_does_not_stage_tensors_whose_bytes_are_stored(tmp_path: Path, seed: int) -> None:
    """Async + dedup: an unchanged host tensor is hashed at save() and referred to, not copied into a staging
    buffer; changing it right after save() returns does not change what that save stored."""
    torch.manual_seed(seed)
    frozen, head = torch.randn(128, 128), torch.randn(8)
    url = str(tmp_path / "run")
    with autockpt.CheckpointManager(url, dedup=True, async_save=True) as mgr:
        mgr.save(1, {"frozen": frozen, "head": head})
        head.add_(1.0)
        mgr.save(2, {"frozen": frozen, "head": head})
        saved_frozen, saved_head = frozen.clone(), head.clone()
        frozen.add_(1.0)  # right after save() returned: the checkpoint of step 2 keeps the old bytes
        head.add_(1.0)
        mgr.wait_until_finished()
        assert "frozen" not in mgr._background._buffers, f"seed {seed}: the unchanged tensor was staged"
        assert "head" in mgr._background._buffers, f"seed {seed}"
    storage = open_storage(url)
    assert set(_new_packs(storage, 2)) == {"head"}, f"seed {seed}"
    target = {"frozen": torch.zeros(128, 128), "head": torch.zeros(8)}
    assert autockpt.CheckpointManager(url).restore(target) == 2
    assert torch.equal(target["frozen"], saved_frozen) and torch.equal(target["head"], saved_head), f"seed {seed}"

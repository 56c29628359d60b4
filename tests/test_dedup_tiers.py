"""Deduplicated checkpoints through the remote tier (issues 14 x 13): packs are written locally, only the packs
the remote lacks are uploaded, each tier collects its own garbage, and a kill mid-upload loses nothing.
Remote: the moto S3 server of tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autockpt
from autockpt.collect import referenced_packs
from autockpt.reader import open_checkpoint, read_manifest
from autockpt.storage import BlobStore, open_storage

FULL = os.environ.get("AUTOCKPT_FULL") == "1"
ENV_PATH = str(Path(__file__).parents[1] / "src")
FROZEN = 2**20  # float32 elements: 4 MiB frozen backbone
ADAPTER = 2**12  # 16 KiB per changing adapter tensor


def lora_state(step: int, seed: int) -> dict[str, np.ndarray]:
    frozen = np.random.default_rng(seed).standard_normal(FROZEN, dtype=np.float32)
    rng = np.random.default_rng([seed, step])
    return {"backbone": frozen, "lora_a": rng.standard_normal(ADAPTER, dtype=np.float32),
            "lora_b": rng.standard_normal(ADAPTER, dtype=np.float32)}


def remote(url: str, opts: dict[str, Any]) -> Any:
    return open_storage(url, {**opts, "skip_instance_cache": True})  # no listing cache shared with the writer


def check_remote(url: str, opts: dict[str, Any], seed: int, where: str,
                 expected: dict[int, dict[str, np.ndarray]] | None = None) -> list[int]:
    """Every remote checkpoint verifies from the remote alone and holds its step's exact values (``expected``, or
    ``lora_state``); no remote pack is unreferenced; returns the remote steps."""
    storage = remote(url, opts)
    steps = sorted(storage.scan().committed)
    manifests = []
    for s in steps:
        m = read_manifest(storage, s)
        manifests.append(m)
        with open_checkpoint(storage, s, m) as ckpt:  # checks every referenced byte against its content hash
            got = autockpt.load(url, step=s, storage_options=opts)
            for k, v in (lora_state(s, seed) if expected is None else expected[s]).items():
                assert np.array_equal(got[k], v), f"{where}: step {s} {k} differs (seed {seed})"
            assert ckpt is not None
    packs = BlobStore(storage).packs()
    assert set(packs) == referenced_packs(manifests), f"{where}: unreferenced remote packs (seed {seed})"
    return steps


def test_lora_saves_upload_only_the_changed_bytes_and_restore_from_the_remote_alone(
        s3_url: tuple[str, dict[str, Any]], tmp_path: Path, seed: int) -> None:
    url, opts = s3_url
    full = sum(v.nbytes for v in lora_state(0, seed).values())
    uploaded = []
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l", max_to_keep=2,
                                    local_max_to_keep=1) as mgr:
        seen: dict[str, int] = {}
        for step in range(1, 6):
            assert mgr.save(step, lora_state(step, seed))
            assert mgr.wait_until_finished(timeout=60) and mgr.durable_step == step
            packs = BlobStore(remote(url, opts)).packs()
            uploaded.append(sum(size for name, size in packs.items() if name not in seen))
            seen.update(packs)
    assert uploaded[0] >= full, f"the first save uploads everything: {uploaded} (seed {seed})"
    for n in uploaded[1:]:
        assert n <= 0.06 * full, f"a LoRA save uploaded {n} of {full} bytes: {uploaded} (seed {seed})"
    assert check_remote(url, opts, seed, "after the run") == [4, 5]
    autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l").close()  # a clean start
    local_packs = BlobStore(open_storage(str(tmp_path / "l"))).packs()
    local_manifests = [read_manifest(open_storage(str(tmp_path / "l")), s)
                       for s in open_storage(str(tmp_path / "l")).scan().committed]
    assert set(local_packs) == referenced_packs(local_manifests), "unreferenced local packs"
    shutil.rmtree(tmp_path / "l")  # the machine is gone: restore from the remote alone
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l2") as mgr:
        target = {k: np.zeros_like(v) for k, v in lora_state(0, seed).items()}
        assert mgr.restore(target) == 5
    for k, v in lora_state(5, seed).items():
        assert np.array_equal(target[k], v), f"{k} differs after a restore from the remote (seed {seed})"


def test_missing_local_pack_falls_back_to_the_remote_copy(s3_url: tuple[str, dict[str, Any]],
                                                          tmp_path: Path, seed: int) -> None:
    url, opts = s3_url
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l") as mgr:
        mgr.save(1, lora_state(1, seed))
        mgr.save(2, lora_state(2, seed))
    for pack in (tmp_path / "l" / "blobs").iterdir():  # the frozen backbone's pack among them
        pack.unlink()
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=tmp_path / "l") as mgr:
        target = {k: np.zeros_like(v) for k, v in lora_state(0, seed).items()}
        assert mgr.restore(target) == 2
    for k, v in lora_state(2, seed).items():
        assert np.array_equal(target[k], v), f"{k} (seed {seed})"


@pytest.mark.parametrize("kill_after", ["first_pack"] + (["save"] if FULL else []))
def test_kill_mid_upload_then_restart_loses_nothing_and_leaves_no_garbage(
        s3_url: tuple[str, dict[str, Any]], tmp_path: Path, seed: int, kill_after: str) -> None:
    url, opts = s3_url
    local = str(tmp_path / "l")
    # the child saves 3 LoRA steps (durable), then saves step 4 and dies at once (its upload barely begun), or
    # once the first of its packs reached the remote (the manifest never did)
    code = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import autockpt\n"
        "from test_dedup_tiers import lora_state\n"
        "from autockpt.storage import BlobStore, open_storage\n"
        f"url, opts, seed = {url!r}, {opts!r}, {seed}\n"
        f"mgr = autockpt.CheckpointManager(url, storage_options=opts, local_dir={local!r}, max_to_keep=2)\n"
        "for s in (1, 2, 3):\n"
        "    mgr.save(s, lora_state(s, seed)); assert mgr.wait_until_finished(timeout=60)\n"
        "before = set(BlobStore(open_storage(url, {**opts, 'skip_instance_cache': True})).packs())\n"
        "mgr.save(4, lora_state(4, seed))\n"
        f"if {kill_after == 'first_pack'}:\n"
        "    while not set(BlobStore(open_storage(url, {**opts, 'skip_instance_cache': True})).packs()) - before:\n"
        "        time.sleep(0.005)\n"
        "os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": ENV_PATH, "PATH": "/usr/bin:/bin"},
                          timeout=240, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-3000:]
    with autockpt.CheckpointManager(url, storage_options=opts, local_dir=local, max_to_keep=2) as mgr:
        target = {k: np.zeros_like(v) for k, v in lora_state(0, seed).items()}
        assert mgr.restore(target) == 4, f"the local-only step 4 is restored (seed {seed})"
        mgr.acquire()  # the writer: the remote's garbage of the killed upload is collected under its lease
        assert mgr.wait_until_finished(timeout=60) and mgr.durable_step == 4
    for k, v in lora_state(4, seed).items():
        assert np.array_equal(target[k], v), f"{k} (seed {seed})"
    steps = check_remote(url, opts, seed, f"after a kill after {kill_after}")
    assert steps in ([2, 3, 4], [3, 4]), f"{steps} (seed {seed})"  # step 2's remote deletion may have been cut


def test_random_saves_restarts_and_machine_losses_through_tiers(s3_url: tuple[str, dict[str, Any]], tmp_path: Path,
                                                                seed: int) -> None:
    """Seeded random runs: saves (the backbone changing now and then), restarts and lost local dirs; at the end
    every remote checkpoint restores exactly from the remote alone, and neither tier holds unreferenced packs."""
    url, opts = s3_url
    rng = np.random.default_rng(seed)
    expected: dict[int, dict[str, np.ndarray]] = {}
    backbone_seed = seed
    local = tmp_path / "l"

    def manager() -> Any:
        return autockpt.CheckpointManager(url, storage_options=opts, local_dir=local, max_to_keep=3,
                                          local_max_to_keep=1)

    mgr = manager()
    ops = []
    n = 12 if FULL else 5
    for step in range(1, n + 1):
        op = rng.choice(["save", "save", "save", "backbone", "restart", "lost"])
        ops.append(str(op))
        if op == "backbone":
            backbone_seed += 1
        elif op in ("restart", "lost"):
            mgr.close()
            if op == "lost":
                shutil.rmtree(local, ignore_errors=True)
            mgr = manager()
        state = {**lora_state(step, seed), "backbone": lora_state(0, backbone_seed)["backbone"]}
        assert mgr.save(step, state), f"{ops} (seed {seed})"
        expected[step] = state
    assert mgr.wait_until_finished(timeout=120), f"{ops} (seed {seed})"
    mgr.close()
    autockpt.CheckpointManager(url, storage_options=opts, local_dir=local).close()  # a clean start (local)
    with manager() as mgr:
        mgr.acquire()  # the writer collects the remote
        assert mgr.wait_until_finished(timeout=120)
    steps = check_remote(url, opts, seed, f"after {ops}", expected)
    assert steps == [n - 2, n - 1, n], f"{steps} after {ops} (seed {seed})"
    storage = open_storage(str(local))
    manifests = [read_manifest(storage, s) for s in storage.scan().committed]
    assert set(BlobStore(storage).packs()) == referenced_packs(manifests), f"local garbage after {ops} (seed {seed})"

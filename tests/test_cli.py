"""The ``autockpt`` command line, run as a real subprocess on real checkpoints (local and moto S3)."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import autockpt
from autockpt.format import dump_manifest
from autockpt.storage import open_storage as Storage
from autockpt.storage import step_dirname

ROOT = Path(__file__).resolve().parents[1]
STEPS = (100, 200, 300, 400)
VAL_LOSS = {100: 0.5, 200: 0.3, 300: 0.4, 400: 0.35}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "autockpt", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def s3_flags(opts: dict[str, Any]) -> list[str]:
    return ["--storage-option", f"key={opts['key']}", "--storage-option", f"secret={opts['secret']}",
            "--storage-option", f"client_kwargs.endpoint_url={opts['client_kwargs']['endpoint_url']}",
            "--storage-option", f"client_kwargs.region_name={opts['client_kwargs']['region_name']}"]


def make_run(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Four checkpoints of a small model + optimizer; returns the model's state dict at the last step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters())
    with autockpt.CheckpointManager(url, max_to_keep=None, storage_options=storage_options,
                                   dedup=False) as mgr:
        for step in STEPS:
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            mgr.save(step, {"model": model, "opt": opt, "epoch": step // 100, "note": "hello"},
                     metrics={"loss": 1.0 / step, "val_loss": VAL_LOSS[step]}, metadata={"run": "cli-test"})
    return {k: v.clone() for k, v in model.state_dict().items()}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def table(stdout: str) -> dict[str, list[str]]:
    """Rows of an ``ls`` table by their first column."""
    lines = [ln for ln in stdout.strip().splitlines() if not ln.startswith("writer lease:")]
    assert lines[0].split()[0] == "STEP"
    return {ln.split()[0]: ln.split() for ln in lines[1:]}


def count_non_tensor_leaves(node: Any) -> int:
    if isinstance(node, (np.ndarray, np.generic, torch.Tensor)):
        return 0
    if isinstance(node, dict):
        return sum(count_non_tensor_leaves(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(count_non_tensor_leaves(v) for v in node)
    return 1


@pytest.fixture
def run(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    url = str(tmp_path / "run")
    return url, make_run(url)


# ------------------------------------------------------------------------------------------------ ls


def test_ls_lists_every_checkpoint_with_metrics_status_and_why_kept(run: tuple[str, dict[str, Any]]) -> None:
    url, _ = run
    r = cli("ls", url)
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert sorted(int(s) for s in rows) == list(STEPS)
    for step in STEPS:
        row = rows[str(step)]
        assert f"val_loss={VAL_LOSS[step]:.6g}" in row and f"loss={1.0 / step:.6g}" in row
        assert row[-2] == "committed"
        assert row[-1] == "newest"  # the run's own policy, recorded in its manifests: max_to_keep=None keeps all

    best = min(VAL_LOSS, key=VAL_LOSS.__getitem__)
    r = cli("ls", url, "--max-to-keep", "2", "--keep-best", "val_loss:min")
    assert r.returncode == 0, r.stderr
    kept = {int(s): row[-1] for s, row in table(r.stdout).items()}
    for step in STEPS:
        expected = [w for w, hit in (("newest", step in sorted(STEPS)[-2:]), ("best", step == best)) if hit]
        assert kept[step] == (",".join(expected) or "prunable")


def test_ls_uses_the_retention_policy_recorded_in_the_newest_manifest(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    kb = autockpt.KeepBest("val_loss", mode="min", k=1)
    with autockpt.CheckpointManager(url, max_to_keep=None) as mgr:  # an earlier policy, in older manifests
        for step in STEPS[:2]:
            mgr.save(step, {"w": np.zeros(2)}, metrics={"val_loss": VAL_LOSS[step]})
    with autockpt.CheckpointManager(url, max_to_keep=2, keep_best=kb) as mgr:
        for step in STEPS[2:]:
            mgr.save(step, {"w": np.zeros(2)}, metrics={"val_loss": VAL_LOSS[step]})
    assert autockpt.load(url)["w"].tolist() == [0.0, 0.0]
    manifest = json.loads((Path(url) / step_dirname(400) / "manifest.json").read_text())["body"]
    assert manifest["retention"] == {"max_to_keep": 2, "keep_every_n_hours": None,
                                     "keep_best": {"metric": "val_loss", "mode": "min", "k": 1}}
    r = cli("ls", url)
    assert r.returncode == 0, r.stderr
    kept = {int(s): row[-1] for s, row in table(r.stdout).items()}
    assert kept == {200: "best", 300: "newest", 400: "newest"}  # the manager pruned 100 with this policy
    r = cli("ls", url, "--max-to-keep", "1")  # options replace the recorded policy
    kept = {int(s): row[-1] for s, row in table(r.stdout).items()}
    assert kept == {200: "prunable", 300: "prunable", 400: "newest"}
    # a manifest written before the policy was recorded still lists; with none recorded only the newest is marked
    for step in (200, 300, 400):
        path = Path(url) / step_dirname(step) / "manifest.json"
        body = json.loads(path.read_text())["body"]
        del body["retention"]
        path.write_bytes(dump_manifest(body))
    r = cli("ls", url)
    assert r.returncode == 0, r.stderr
    kept = {int(s): row[-1] for s, row in table(r.stdout).items()}
    assert kept == {200: "-", 300: "-", 400: "newest"}
    assert autockpt.CheckpointManager(url).latest_step == 400


def test_show_and_verify_help_describe_the_command() -> None:
    for command, words in (("show", "manifest in human form"),
                           ("verify", "checksum (xxh3-64 per file, xxh3-128 per tensor in shared packs)")):
        r = cli(command, "--help")
        assert r.returncode == 0, r.stderr
        usage_end = r.stdout.index("positional arguments")
        assert words in " ".join(r.stdout[:usage_end].split()), r.stdout


def test_ls_shows_leftovers_and_damage(run: tuple[str, dict[str, Any]]) -> None:
    url, _ = run
    root = Path(url)
    (root / ".tmp-step_0000000500-0123abcd").mkdir()
    (root / "step_0000000600").mkdir()  # a step directory without a manifest
    (root / step_dirname(200) / "tensors.safetensors").write_bytes(b"short")
    r = cli("ls", url)
    assert r.returncode == 1  # a checkpoint is damaged
    rows = table(r.stdout)
    assert "temporary: .tmp-step_0000000500-0123abcd" in " ".join(rows["500"])
    assert "uncommitted: step_0000000600 has no manifest" in " ".join(rows["600"])
    assert "DAMAGED:" in " ".join(rows["200"]) and "5 bytes" in " ".join(rows["200"])
    assert rows["100"][-2] == "committed"


# ------------------------------------------------------------------------------------------------ show


def test_show_prints_tree_tensors_and_metadata(run: tuple[str, dict[str, Any]]) -> None:
    url, weights = run
    r = cli("show", url, "--step", "300")
    assert r.returncode == 0, r.stderr
    assert "step         300" in r.stdout
    assert '{"run": "cli-test"}' in r.stdout
    assert f"val_loss={VAL_LOSS[300]:.6g}" in r.stdout
    for name, t in weights.items():
        shape = "[" + ", ".join(map(str, t.shape)) + "]"
        assert f"{name}: tensor F32 {shape}" in r.stdout and f"(model/{name})" in r.stdout
    assert "torch.optim.adam.Adam" in r.stdout
    assert 'note: "hello"' in r.stdout and "epoch: 3" in r.stdout

    j = cli("show", url, "--json")
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["step"] == max(STEPS)


# ------------------------------------------------------------------------------------------------ verify


def test_verify_passes_then_names_the_damaged_step_and_file(run: tuple[str, dict[str, Any]]) -> None:
    url, _ = run
    r = cli("verify", url, "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [ln.split(":")[0] for ln in r.stdout.splitlines()] == [f"step {s}" for s in STEPS]
    assert all(": ok (" in ln for ln in r.stdout.splitlines())

    flip_byte(Path(url) / step_dirname(200) / "tensors.safetensors")
    r = cli("verify", url, "--all")
    assert r.returncode == 1
    failed = [ln for ln in r.stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and failed[0].startswith("step 200:") and "tensors.safetensors" in failed[0]
    assert "checksum" in failed[0]
    assert "1 of 4" in r.stderr
    assert cli("verify", url, "--step", "200").returncode == 1
    assert cli("verify", url).returncode == 0  # the newest is intact
    assert cli("ls", url, "--verify").returncode == 1
    assert cli("ls", url).returncode == 0  # sizes alone do not see a flipped byte


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("command", [["ls"], ["show"], ["verify"], ["prune", "--max-to-keep", "1"],
                                     ["export", "--to", "x.safetensors"]])
def test_missing_directory_is_one_clear_line(tmp_path: Path, command: list[str]) -> None:
    missing = str(tmp_path / "no-such-run")
    r = cli(command[0], missing, *command[1:], cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert f"no checkpoint directory at {missing}" in r.stderr and "Check the path" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_arguments(run: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, _ = run
    cases = [
        (["verify", url, "--step", "x"], "--step"),
        (["verify", url, "--step", "1", "--all"], "not allowed with"),
        (["verify", url, "--step", "7"], "no committed checkpoint at step 7"),
        (["prune", url], "--max-to-keep"),
        (["prune", url, "--max-to-keep", "0"], "--max-to-keep"),
        (["ls", url, "--keep-best", "val_loss:median"], "--keep-best"),
        (["ls", url, "--storage-option", "novalue"], "KEY=VALUE"),
        (["ls", url, "--storage-options", "[1]"], "JSON object"),
        (["export", url, "--to", str(tmp_path / "m.txt")], ".safetensors, .pt or .pth"),
        (["export", url, "--to", str(tmp_path / "m.pt"), "--key", "nope"], "no 'nope'"),
        (["import", str(tmp_path / "absent.pt"), "--to", url, "--step", "1"], "no file"),
        (["import", str(tmp_path), "--to", url, "--step", "x"], "--step"),
        (["frobnicate", url], "invalid choice"),
    ]
    for args, needle in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)


def test_storage_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = cli("ls", str(tmp_path / "empty"))
    assert r.returncode == 0 and "no checkpoints" in r.stdout
    r = cli("verify", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no committed checkpoints" in r.stderr


# ------------------------------------------------------------------------------------------------ prune


def test_prune_dry_run_deletes_nothing_then_prunes_only_ours(run: tuple[str, dict[str, Any]]) -> None:
    url, _ = run
    root = Path(url)
    (root / "notes.txt").write_text("mine")
    (root / ".tmp-step_0000000500-0123abcd").mkdir()
    best = min(VAL_LOSS, key=VAL_LOSS.__getitem__)
    expected_kept = {max(STEPS), best}

    r = cli("prune", url, "--max-to-keep", "1", "--keep-best", "val_loss", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert sorted(Storage(url).scan().committed) == list(STEPS)
    would = {int(ln.split()[1].rstrip(":")) for ln in r.stdout.splitlines() if "would delete" in ln and
             ln.startswith("step")}
    assert would == set(STEPS) - expected_kept

    r = cli("prune", url, "--max-to-keep", "1", "--keep-best", "val_loss")
    assert r.returncode == 0, r.stderr
    assert set(Storage(url).scan().committed) == expected_kept
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / ".tmp-step_0000000500-0123abcd").is_dir()
    assert cli("verify", url, "--all").returncode == 0


def test_prune_beside_a_running_writer_refuses_and_deletes_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    writer = ROOT / "tests" / "scripts" / "fault_writer.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(writer), url, "-", "3", "16", "hold"], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("holding"):
                break
        before = sorted(Storage(url).scan().committed)
        r = cli("prune", url, "--max-to-keep", "1")
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "another process is writing checkpoints" in r.stderr and f"pid {proc.pid}" in r.stderr, r.stderr
        assert sorted(Storage(url).scan().committed) == before == [2, 3]
        assert cli("prune", url, "--max-to-keep", "1", "--dry-run").returncode == 0  # looking is always allowed
    finally:
        proc.kill()
        proc.wait(timeout=30)
    r = cli("prune", url, "--max-to-keep", "1")  # the writer is gone (its lease names a dead pid): allowed
    assert r.returncode == 0, r.stderr
    assert sorted(Storage(url).scan().committed) == [3]


# ------------------------------------------------------------------------------------------------ export


def test_export_pt_loads_with_weights_only(run: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, weights = run
    out = tmp_path / "model.pt"
    r = cli("export", url, "--to", str(out), "--key", "model")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # a model's state dict has only tensors: nothing dropped
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(weights)
    for k, v in weights.items():
        assert torch.equal(loaded[k], v)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model.load_state_dict(loaded)  # a plain state dict, as promised


def test_export_safetensors_whole_state_drops_non_tensors(run: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    from safetensors import safe_open

    url, weights = run
    out = tmp_path / "all.safetensors"
    r = cli("export", url, "--step", "400", "--to", str(out))
    assert r.returncode == 0, r.stderr
    state = autockpt.load(url, step=400)
    dropped = count_non_tensor_leaves(state)
    assert f"note: {dropped} non-tensor value(s) were left out" in r.stderr
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        for k, v in weights.items():
            assert torch.equal(f.get_tensor(f"model.{k}"), v)
        assert torch.equal(f.get_tensor("opt.state.0.exp_avg"), state["opt"]["state"][0]["exp_avg"])
    assert "epoch" not in keys and "note" not in keys


def test_export_refuses_a_damaged_checkpoint(run: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, _ = run
    flip_byte(Path(url) / step_dirname(400) / "tensors.safetensors")
    out = tmp_path / "model.safetensors"
    r = cli("export", url, "--to", str(out))
    assert r.returncode == 1
    assert "checkpoint damaged" in r.stderr and "step_0000000400" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ import


def test_import_safetensors_and_state_dict_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    url = str(tmp_path / "imported")
    sd = torch.nn.Linear(3, 2).state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)},
              str(tmp_path / "w.safetensors"))

    r = cli("import", str(tmp_path / "sd.pt"), "--to", url, "--step", "10")
    assert r.returncode == 0, r.stderr
    got = autockpt.load(url, step=10)
    assert set(got) == {"model"} and set(got["model"]) == set(sd)
    assert all(torch.equal(got["model"][k], v) for k, v in sd.items())
    model = torch.nn.Linear(3, 2)
    with autockpt.CheckpointManager(url, max_to_keep=None) as mgr:
        assert mgr.restore({"model": model}, step=10) == 10
    assert torch.equal(model.weight, sd["weight"])

    r = cli("import", str(tmp_path / "w.safetensors"), "--to", url, "--step", "20")
    assert r.returncode == 0, r.stderr
    got = autockpt.load(url, step=20)["model"]
    assert torch.equal(got["a"], torch.arange(6.0).reshape(2, 3)) and got["b"].dtype == torch.int64

    r = cli("import", str(tmp_path / "sd.pt"), "--to", url, "--step", "10")
    assert r.returncode == 2 and "already has a checkpoint at step 10" in r.stderr


def test_import_needs_trust_pickle_for_python_objects(tmp_path: Path) -> None:
    url = str(tmp_path / "imported")
    f = tmp_path / "extra.pt"
    torch.save({"w": torch.ones(2), "counts": collections.ChainMap({"a": 3})}, f)

    r = cli("import", str(f), "--to", url, "--step", "1")
    assert r.returncode == 2
    assert "--trust-pickle" in r.stderr and "collections.ChainMap" in r.stderr and "Traceback" not in r.stderr
    assert not Path(url).exists()

    r = cli("import", str(f), "--to", url, "--step", "1", "--trust-pickle")
    assert r.returncode == 0, r.stderr
    got = autockpt.load(url, step=1)["model"]
    assert got["counts"] == {"a": 3} and torch.equal(got["w"], torch.ones(2))

    bad = tmp_path / "ns.pt"
    torch.save({"w": torch.ones(2), "args": Path("/x")}, bad)
    r = cli("import", str(bad), "--to", url, "--step", "2", "--trust-pickle")
    assert r.returncode == 2
    assert "model/args" in r.stderr and "cannot be stored without pickle" in r.stderr
    assert sorted(Storage(url).scan().committed) == [1]

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    r = cli("import", str(junk), "--to", url, "--step", "3")
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_import_lightning_ckpt(tmp_path: Path) -> None:
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, hidden: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, hidden)

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    module = Tiny()
    trainer.fit(module, data)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(str(ckpt))

    url = str(tmp_path / "imported")
    r = cli("import", str(ckpt), "--to", url, "--step", "2")
    assert r.returncode == 0, r.stderr
    assert "lightning.ckpt" in r.stdout
    got = autockpt.load(url, step=2)["lightning"]
    assert got["global_step"] == 2 and got["hyper_parameters"]["hidden"] == 3
    for k, v in module.state_dict().items():
        assert torch.equal(got["state_dict"][k], v)
    assert autockpt.load(url, step=2).keys() == {"lightning"}


def test_import_keras_weights_h5(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import h5py
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / "model.weights.h5"
    model.save_weights(str(path))
    expected: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: expected.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    assert len(expected) == 2

    url = str(tmp_path / "imported")
    r = cli("import", str(path), "--to", url, "--step", "5")
    assert r.returncode == 0, r.stderr
    got = autockpt.load(url, step=5)["model"]
    assert set(got) == set(expected)
    kernel, bias = (np.asarray(w) for w in model.get_weights())
    values = sorted((np.asarray(v) for v in got.values()), key=lambda a: a.ndim)
    np.testing.assert_array_equal(values[0], bias)
    np.testing.assert_array_equal(values[1], kernel)


# ------------------------------------------------------------------------------------------------ S3


@pytest.mark.full
def test_s3_every_command(s3_url: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    import fsspec

    url, opts = s3_url
    weights = make_run(url, opts)
    flags = s3_flags(opts)

    r = cli("ls", url, *flags)
    assert r.returncode == 0, r.stderr
    assert sorted(int(s) for s in table(r.stdout)) == list(STEPS)

    r = cli("show", url, "--storage-options", json.dumps(opts))  # the JSON form
    assert r.returncode == 0, r.stderr
    assert "(model/0.weight)" in r.stdout

    out = tmp_path / "m.safetensors"
    r = cli("export", url, "--to", str(out), "--key", "model", *flags)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(str(out))[k], v) for k, v in weights.items())

    torch.save(weights, tmp_path / "sd.pt")
    r = cli("import", str(tmp_path / "sd.pt"), "--to", url, "--step", "500", *flags)
    assert r.returncode == 0, r.stderr
    assert torch.equal(autockpt.load(url, 500, opts)["model"]["0.weight"], weights["0.weight"])

    r = cli("prune", url, "--max-to-keep", "2", *flags)
    assert r.returncode == 0, r.stderr
    assert sorted(Storage(url, opts).scan().committed) == [400, 500]

    fs = fsspec.filesystem("s3", **opts)
    path = f"{url.removeprefix('s3://')}/{step_dirname(400)}/tensors.safetensors"
    data = bytearray(fs.cat_file(path))
    data[-3] ^= 0x40
    fs.pipe_file(path, bytes(data))
    r = cli("verify", url, "--all", *flags)
    assert r.returncode == 1
    assert any(ln.startswith("step 400: FAILED") and "tensors.safetensors" in ln for ln in r.stdout.splitlines())
    assert any(ln.startswith("step 500: ok") for ln in r.stdout.splitlines())

    missing = url.rsplit("/", 1)[0] + "/no-such-run"
    r = cli("ls", missing, *flags)
    assert r.returncode == 2 and f"no checkpoint directory at {missing}" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ packaging


def test_console_script_and_no_torch_import() -> None:
    scripts = re.search(r"^\[project\.scripts\]\n((?:.+\n)*)", (ROOT / "pyproject.toml").read_text(), re.M)
    assert scripts is not None and scripts.group(1).strip() == 'autockpt = "autockpt.cli:main"'
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    code = ("import sys, autockpt, autockpt.cli, autockpt.progress; assert 'torch' not in sys.modules; "
            "sys.argv = ['autockpt', '--version']; autockpt.cli.main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"autockpt {autockpt.__version__}"

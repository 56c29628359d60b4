"""AutoCheckpoint for PyTorch Lightning: real training in subprocesses, killed with real signals, resumed exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from safetensors.torch import load_file  # noqa: E402

import autockpt  # noqa: E402
from autockpt.errors import InvalidArgumentError, UnsupportedValueError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "lightning_train.py"
STEPS = 48  # 3 epochs of 16 batches


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(tmp: Path, package: str, kill: tuple[int, int] | None = None, strategy: str = "auto",
         timeout: float = 240) -> tuple[int, int | None]:
    """One run of the identical fit; with ``kill=(signal, step)``, send the signal once the child printed
    that step. Returns (exit code, last step printed)."""
    args = [sys.executable, str(SCRIPT), str(tmp / "ckpt"), str(tmp / "log"), str(tmp / "weights.safetensors"),
            package, strategy, "0.01" if kill else "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
                            start_new_session=True)
    last = None
    sent = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("STEP "):
                last = int(line.split()[1])
                if kill is not None and not sent and last >= kill[1]:
                    if kill[0] == signal.SIGKILL:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, kill[0])
                    sent = True
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, last


def _segments(log: Path) -> list[list[tuple[int, str]]]:
    """The log split into runs: each a list of (global_step, sample indices)."""
    runs: list[list[tuple[int, str]]] = []
    for line in log.read_text().splitlines():
        if line.startswith("START"):
            runs.append([])
        elif line.startswith("STEP "):
            _, step, idx = line.split()
            runs[-1].append((int(step), idx))
    return runs


def _ends(log: Path) -> list[dict[str, str]]:
    return [dict(kv.split("=") for kv in line.split()[1:]) for line in log.read_text().splitlines()
            if line.startswith("END")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run: its weights and its (step, samples) sequence."""
    tmp = tmp_path_factory.mktemp("reference")
    rc, last = _run(tmp, "lightning")
    assert rc == 0 and last == STEPS - 1
    (run,) = _segments(tmp / "log")
    assert [s for s, _ in run] == list(range(STEPS))
    return {"weights": load_file(str(tmp / "weights.safetensors")), "steps": run}


def _check_resumed(tmp: Path, reference: dict[str, Any], sigterm_runs: set[int]) -> None:
    weights = load_file(str(tmp / "weights.safetensors"))
    assert weights.keys() == reference["weights"].keys()
    for k, v in reference["weights"].items():
        assert torch.equal(weights[k], v), k
    runs = _segments(tmp / "log")
    ends = _ends(tmp / "log")
    effective: dict[int, str] = {}
    for i, run in enumerate(runs):
        steps = [s for s, _ in run]
        start = steps[0] if steps else None
        # within a run: consecutive global steps, no gap, no repeat
        assert steps == list(range(start, start + len(steps))) if steps else True
        if i > 0:
            prev = [s for s, _ in runs[i - 1]]
            if i - 1 in sigterm_runs:  # preempted: saved the step it reached; continues right after it
                assert start == prev[-1] + 1, (i, start, prev[-1])
            else:  # SIGKILL: continues right after the newest checkpoint, which is at most where it died
                assert start is not None and start <= prev[-1] + 1
        for s, idx in run:
            effective[s] = idx  # a step redone after SIGKILL replaces the lost one
    # every step trained with exactly the samples of the uninterrupted run, in the same order
    assert [(s, effective[s]) for s in sorted(effective)] == reference["steps"]
    assert ends[-1]["preempted"] == "0" and int(ends[-1]["step"]) == STEPS


@pytest.mark.timeout(600)
@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_killed_and_resumed_matches_uninterrupted(tmp_path: Path, reference: dict[str, Any], package: str) -> None:
    if package == "pytorch_lightning":
        pytest.importorskip("pytorch_lightning")
    rng = random.Random(os.getpid())
    if package == "pytorch_lightning":  # the other package's Trainer: one preemption mid-epoch, then finish
        rc, last = _run(tmp_path, package, kill=(signal.SIGTERM, rng.randrange(3, 14)))
        assert rc == 128 + signal.SIGTERM and _ends(tmp_path / "log")[-1]["preempted"] == "1"
        assert _run(tmp_path, package)[0] == 0
        _check_resumed(tmp_path, reference, {0})
        return
    # a SIGKILL and a SIGTERM mid-epoch each (epochs have 16 batches), then one of either at a random step
    kills = [(signal.SIGKILL, rng.choice([3, 7, 9, 12])),
             (signal.SIGTERM, rng.choice([18, 21, 26, 29])),
             (rng.choice([signal.SIGKILL, signal.SIGTERM]), rng.randrange(33, 46))]
    sigterm_runs = set()
    for i, (sig, at) in enumerate(kills):
        rc, last = _run(tmp_path, package, kill=(sig, at))
        assert last is not None and last >= at
        if sig == signal.SIGTERM:
            sigterm_runs.add(i)
            assert rc == 128 + signal.SIGTERM  # saved, then left with the scheduler's exit code
            assert _ends(tmp_path / "log")[-1]["preempted"] == "1"
            assert int(_ends(tmp_path / "log")[-1]["step"]) == last + 1
        else:
            assert rc == -signal.SIGKILL
    rc, last = _run(tmp_path, package)
    assert rc == 0
    _check_resumed(tmp_path, reference, sigterm_runs)
    # the identical call once more: the run is complete, nothing is trained again
    before = len(_segments(tmp_path / "log"))
    assert _run(tmp_path, package) == (0, None)
    assert len(_segments(tmp_path / "log")) == before + 1 and _segments(tmp_path / "log")[-1] == []


@pytest.mark.timeout(400)
def test_ddp_two_processes_killed_and_resumed(tmp_path: Path) -> None:
    """strategy="ddp", 2 CPU processes (gloo): SIGKILL of both mid-epoch, SIGTERM to rank 0 only, then finish."""
    total = STEPS // 2  # each rank sees half of every epoch
    rc, last = _run(tmp_path, "lightning", kill=(signal.SIGKILL, 12), strategy="ddp")
    assert rc == -signal.SIGKILL and last is not None and last >= 12
    saved = autockpt.CheckpointManager(tmp_path / "ckpt").latest_step
    assert saved is not None and saved % 5 == 0 and 10 <= saved <= last + 1
    rc, last = _run(tmp_path, "lightning", kill=(signal.SIGTERM, 17), strategy="ddp")
    assert rc == 128 + signal.SIGTERM
    rc, last = _run(tmp_path, "lightning", strategy="ddp")
    assert rc == 0 and last == total - 1
    for log in (tmp_path / "log", tmp_path / "log.rank1"):
        runs = _segments(log)
        ends = _ends(log)
        assert len(runs) == 3
        assert [s for s, _ in runs[1]][0] == saved  # resumed right after the checkpoint (steps log 0-based)
        # preempted on both ranks at the same step, the one rank 0 reached; continued right after it
        assert ends[0]["preempted"] == "1" and int(ends[0]["step"]) == runs[1][-1][0] + 1
        assert [s for s, _ in runs[2]][0] == runs[1][-1][0] + 1
        for run in runs:
            steps = [s for s, _ in run]
            assert steps == list(range(steps[0], steps[0] + len(steps)))
        assert int(ends[-1]["step"]) == total and ends[-1]["preempted"] == "0"
    r0, r1 = _ends(tmp_path / "log"), _ends(tmp_path / "log.rank1")
    assert [e["step"] for e in r0] == [e["step"] for e in r1]
    # the two ranks trained disjoint halves of the data at every step
    for (s0, i0), (s1, i1) in zip(_segments(tmp_path / "log")[2], _segments(tmp_path / "log.rank1")[2], strict=True):
        assert s0 == s1 and not set(i0.split(",")) & set(i1.split(","))
    assert load_file(str(tmp_path / "weights.safetensors"))


class _Opaque:
    pass


def test_unsupported_hyperparameter_is_named(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from autockpt.integrations.lightning import AutoCheckpoint

    class Net(pl.LightningModule):
        def __init__(self, thing: Any) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[AutoCheckpoint(tmp_path / "c", every_n_train_steps=1)])
    with pytest.raises(UnsupportedValueError, match="hyper_parameters/thing"):
        trainer.fit(Net(_Opaque()), loader)
    assert autockpt.CheckpointManager(tmp_path / "c").all_steps() == []


def test_private_lightning_pieces_still_exist() -> None:
    """Pins the private Lightning attributes the integration relies on (see the module docstring)."""
    import lightning.pytorch as pl

    for package in (pl, pytest.importorskip("pytorch_lightning")):
        trainer = package.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        connector = trainer._checkpoint_connector
        assert callable(connector.dump_checkpoint) and isinstance(connector._loaded_checkpoint, dict)
        assert trainer._signal_connector.received_sigterm is False
        # resume_start(None) must leave a pre-loaded checkpoint for restore_model/restore_training_state
        connector._loaded_checkpoint = {"marker": 1}
        connector.resume_start(None)
        assert connector._loaded_checkpoint == {"marker": 1}


@pytest.mark.parametrize("kwargs", [
    {"every_n_train_steps": 0}, {"every_n_train_steps": 2.5}, {"every_n_epochs": -1},
    {"train_time_interval": 0}, {"max_to_keep": 0}, {"keep_every_n_hours": -2},
    {"monitor": "val_loss", "mode": "up"}, {"monitor": "val_loss", "save_top_k": 0}, {"save_top_k": 3},
    {"storage_options": "x"}, {"preemption_signals": ["SIGNOPE"]},
])
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    from autockpt.integrations.lightning import AutoCheckpoint

    with pytest.raises(InvalidArgumentError):
        AutoCheckpoint(tmp_path, **kwargs)
    with pytest.raises(InvalidArgumentError, match="directory"):
        AutoCheckpoint("")


def test_callback_is_accepted_by_both_packages(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from autockpt.integrations.lightning import AutoCheckpoint

    cb = AutoCheckpoint(tmp_path)
    assert isinstance(cb, pl.Callback)
    assert isinstance(cb, pytest.importorskip("pytorch_lightning").Callback)

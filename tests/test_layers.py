"""The structure stays as built: storage is the only place that knows local from remote, the import layers hold,
errors from other ranks carry their facts, and options are checked in one place with one text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import autockpt
from autockpt.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    RankFailureError,
    StateMismatchError,
    failed_on_ranks,
)
from autockpt.options import ManagerOptions

SRC = Path(__file__).resolve().parent.parent / "src" / "autockpt"


def test_only_the_storage_package_knows_local_from_remote() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "storage") in path.parents:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"atomic_rename|LocalFileSystem|\.fs\.", line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []


def test_import_layers_hold() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    out = subprocess.run([str(exe), "--no-cache"], cwd=SRC.parent.parent, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_failure_on_other_ranks_keeps_its_class_and_every_rank() -> None:
    mismatch = StateMismatchError("keys differ", missing=["model/w"])
    err = failed_on_ranks({2: CorruptCheckpointError("bad checksum"), 1: mismatch})
    assert isinstance(err, RankFailureError) and isinstance(err, StateMismatchError)  # the first rank's class
    assert str(err) == "on rank 1: keys differ"
    assert err.missing == ["model/w"]
    assert sorted(err.failures) == [1, 2] and isinstance(err.failures[2], CorruptCheckpointError)
    other = failed_on_ranks({3: ValueError("not ours")})
    assert isinstance(other, autockpt.errors.SaveError) and list(other.failures) == [3]


def test_options_are_checked_in_one_place_with_one_text(tmp_path: Path) -> None:
    messages = []
    for make in (lambda: ManagerOptions(async_save="yes"),  # type: ignore[arg-type]
                 lambda: autockpt.CheckpointManager(tmp_path, async_save="yes"),
                 lambda: autockpt.resume(tmp_path, async_save="yes")):
        with pytest.raises(InvalidArgumentError) as info:
            make()
        messages.append(str(info.value))
    assert messages == ["async_save must be True or False, got 'yes'"] * 3
    assert "max_to_keep" in ManagerOptions.names() and "directory" not in ManagerOptions.names()


@pytest.mark.parametrize("option,bad", [
    ("directory", ""),
    ("max_to_keep", 0),
    ("keep_every_n_hours", "6"),
    ("async_save", "yes"),
    ("storage_options", "key=x"),
    ("interval", -1),  # each entry point names its own time interval
])
def test_a_bad_shared_option_gives_the_same_message_from_every_entry_point(tmp_path: Path, option: str,
                                                                            bad: object) -> None:
    keras_cb = pytest.importorskip("autockpt.integrations.keras").AutoCheckpoint
    lightning_cb = pytest.importorskip("autockpt.integrations.lightning").AutoCheckpoint
    hf_cb = pytest.importorskip("autockpt.integrations.transformers").AutoCheckpoint
    interval = {"manager": "save_interval_seconds", "resume": "every_n_seconds", "keras": "save_every_seconds",
                "lightning": "train_time_interval", "transformers": "save_every_seconds"}
    makers = {"manager": autockpt.CheckpointManager, "resume": autockpt.resume, "keras": keras_cb,
              "lightning": lightning_cb, "transformers": hf_cb}
    messages = {}
    for where, make in makers.items():
        if where == "lightning" and option == "async_save":
            continue  # the Lightning callback has no async_save
        name = interval[where] if option == "interval" else option
        kwargs: dict[str, object] = {"directory": str(tmp_path / where), name: bad}
        with pytest.raises(InvalidArgumentError) as info:
            make(**kwargs)
        messages[where] = str(info.value).replace(name, "<option>")
    assert len(set(messages.values())) == 1, messages
    assert repr(bad) in messages["manager"]
    assert list(tmp_path.iterdir()) == []  # refused before anything was created

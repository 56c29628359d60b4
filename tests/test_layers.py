"""The structure stays as built: storage is the only place that knows local from remote, the import layers hold,
errors from other ranks carry their facts, and options are checked in one place with one text."""

from __future__ import annotations

import ast
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


def test_only_the_storage_package_names_the_tiered_storage() -> None:
    """A tiered or content-addressed storage plugs in through the Storage interface (pack_storage, grouped,
    resume_uploads, ...): the manager and the collector never ask which kind they have. Left: the CLI's --local-dir
    commands (ls, sync) and the torch.distributed coordinator's tiered save protocol (one rank per local dir)."""
    allowed = {"cli.py", "coordination/torch_dist.py"}
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("storage/") or rel in allowed:
            continue
        offenders += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                      if "TieredStorage" in line]
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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _autockpt_imports(path: Path, tree: ast.Module) -> set[str]:
    """Every autockpt module ``path`` imports, at the top or inside a function."""
    package = _module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{name}.{a.name}" for a in node.names} if node.module is None or name == "autockpt" \
                else {name}
    return {n for n in found if n.startswith("autockpt.")}


def test_every_module_docstring_names_its_job_and_what_it_imports() -> None:
    """Issue 12: each module's docstring states its one job ("One job: ...") and what it may import ("Imports
    ..."), naming every module of autockpt it imports: a sibling in its own package by its short name (or "the
    package's own modules"), anything else by its name under autockpt (``autockpt.storage``, ``errors``)."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        doc, me = ast.get_docstring(tree) or "", _module_name(path)
        if not re.search(r"\bOne job\b", doc):
            problems.append(f"{me}: no 'One job: ...' sentence")
        if not re.search(r"\bImports\b", doc):
            problems.append(f"{me}: no 'Imports ...' sentence")
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for imported in sorted(_autockpt_imports(path, tree)):
            if imported.startswith(package + ".") and package != "autockpt":
                name = imported[len(package) + 1:].split(".")[0]  # a sibling in the same package
                if "package's own modules" in doc:
                    continue
            else:
                name = imported.split(".")[1]  # another part of autockpt, by its top-level name
            if name == me.split(".")[-1] or (name == "integrations" and me.startswith("autockpt.integrations")):
                continue
            if not re.search(rf"(?<![\w.]){re.escape(name)}\b|autockpt\.{re.escape(name)}\b|{re.escape(imported)}\b",
                             doc):
                problems.append(f"{me}: imports {imported} but its docstring does not name {name!r}")
    assert problems == [], "\n".join(problems)

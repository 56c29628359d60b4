"""ProgressReporter: draws on a real pseudo-terminal when asked, and nothing anywhere else."""

from __future__ import annotations

import io
import os
import pty
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from autockpt.progress import ProgressReporter, format_bytes

MiB = 2**20


@pytest.fixture
def terminal() -> Iterator[tuple[TextIO, int]]:
    """(a text stream on the slave side of a pseudo-terminal, the master fd to read what was drawn)."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    try:
        yield stream, master
    finally:
        stream.close()
        os.close(master)


def drain(master: int) -> str:
    out = b""
    poller = select.poll()  # unlike select(), poll() takes descriptors above 1023
    poller.register(master, select.POLLIN)
    while poller.poll(200):
        chunk = os.read(master, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode()


def test_draws_one_updating_line_on_a_tty(terminal: tuple[TextIO, int]) -> None:
    stream, master = terminal
    assert stream.isatty()
    total = 100 * MiB
    rep = ProgressReporter(total, "saving step 7", enabled=True, stream=stream)
    assert rep.active
    rep.update(10 * MiB)  # the first update draws
    time.sleep(0.25)
    rep.update(40 * MiB)
    rep.update(total - 50 * MiB)
    rep.close()
    rep.close()  # idempotent
    text = drain(master)
    assert text.count("\r") >= 3  # two redraws and the final one (plus the pty's \r\n)
    assert text.endswith("\n") and text.count("\n") == 1
    lines = [seg for seg in text.replace("\r\n", "").split("\r") if seg]
    assert lines[0].startswith("saving step 7: 10.0 MiB / 100.0 MiB (10%)")
    assert lines[-1].startswith("saving step 7: 100.0 MiB / 100.0 MiB (100%)")
    assert all(seg.rstrip().endswith("MB/s") for seg in lines)


def test_redraws_are_throttled(terminal: tuple[TextIO, int]) -> None:
    stream, master = terminal
    rep = ProgressReporter(1000 * MiB, "restoring", enabled=True, stream=stream)
    for _ in range(1000):
        rep.update(MiB)
    rep.close()
    draws = drain(master).replace("\r\n", "\n").count("\r")
    assert 2 <= draws < 20  # not one per update


@pytest.mark.parametrize("why", ["disabled", "small"])
def test_silent_on_a_tty_when_not_asked_or_small(terminal: tuple[TextIO, int], why: str) -> None:
    stream, master = terminal
    if why == "disabled":
        rep = ProgressReporter(100 * MiB, "saving", enabled=False, stream=stream)
    else:
        rep = ProgressReporter(64 * MiB - 1, "saving", enabled=True, stream=stream)
    rep.update(100 * MiB)
    rep.close()
    assert not rep.active
    assert drain(master) == ""


def test_silent_on_a_file_and_a_string_buffer(tmp_path: Path) -> None:
    buf = io.StringIO()
    with ProgressReporter(100 * MiB, "saving", enabled=True, stream=buf) as rep:
        rep.update(100 * MiB)
    assert buf.getvalue() == ""
    path = tmp_path / "log.txt"
    with open(path, "w") as f:
        with ProgressReporter(100 * MiB, "saving", enabled=True, stream=f) as rep:
            rep.update(100 * MiB)
    assert path.read_text() == ""
    assert rep.done == 100 * MiB and rep.rate > 0


def test_a_closed_terminal_never_fails_the_caller() -> None:
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    rep = ProgressReporter(100 * MiB, "saving", enabled=True, stream=stream)
    stream.close()
    os.close(master)
    rep.update(100 * MiB)  # writing to a closed stream: swallowed, drawing stops
    rep.close()
    assert not rep.active


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * MiB) == "3.0 MiB"
    assert format_bytes(5 * 2**40) == "5.0 TiB"


def test_manager_shows_progress_when_asked_and_logs_one_line_always(
    terminal: tuple[TextIO, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import numpy as np

    import autockpt

    stream, master = terminal
    monkeypatch.setattr("sys.stderr", stream)
    state = {"w": np.ones(80 * MiB // 4, np.float32)}  # 80 MiB: above the 64 MiB threshold
    with caplog.at_level(logging.INFO, logger="autockpt"):
        with autockpt.CheckpointManager(tmp_path / "a", progress=True) as mgr:
            mgr.save(1, state)
            mgr.restore({"w": np.zeros_like(state["w"])})
    drawn = drain(master)
    assert "autockpt: saving step 1: 80.0 MiB / 80.0 MiB (100%)" in drawn
    assert "autockpt: restoring step 1: 80.0 MiB / 80.0 MiB (100%)" in drawn
    summaries = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("autockpt: saved step 1") and "MB/s" in m for m in summaries)
    assert any(m.startswith("autockpt: restored step 1") and "MB/s" in m for m in summaries)
    # without progress=True, and with the logger silenced, nothing at all is written
    caplog.clear()
    logging.getLogger("autockpt").disabled = True
    try:
        with autockpt.CheckpointManager(tmp_path / "b") as mgr:
            mgr.save(1, state)
            mgr.restore({"w": np.zeros_like(state["w"])})
    finally:
        logging.getLogger("autockpt").disabled = False
    assert drain(master) == "" and caplog.records == []

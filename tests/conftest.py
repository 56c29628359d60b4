"""Shared fixtures: a real S3-compatible server (moto_server) on 127.0.0.1, and storage URLs to test on."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# No test polls a real cloud metadata service (169.254.169.254), whatever the shell exports: cloud preemption
# notices are off unless a test turns them on against its own fake server on 127.0.0.1 (tests/test_cloud_notice.py).
os.environ["AUTOCKPT_CLOUD"] = "none"
os.environ.pop("AUTOCKPT_METADATA_URL", None)
os.environ.pop("AUTOCKPT_DMI_ROOT", None)

# One seed for every randomized test of a session: AUTOCKPT_SEED replays a failure, else a new one is drawn.
SEED = int(os.environ.get("AUTOCKPT_SEED") or random.SystemRandom().randrange(2**31))
os.environ["AUTOCKPT_SEED"] = str(SEED)  # subprocesses of a test see the same seed


def pytest_report_header(config: pytest.Config) -> str:
    return f"autockpt: AUTOCKPT_SEED={SEED} (set it to replay this run's random choices)"


def pytest_configure(config: pytest.Config) -> None:
    # hypothesis draws from the same seed, so AUTOCKPT_SEED replays its examples too
    if getattr(config.option, "hypothesis_seed", "absent") is None:
        config.option.hypothesis_seed = SEED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("seed", f"replay with AUTOCKPT_SEED={SEED}"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.full`` (a test, or one ``pytest.param``): a long variant, run only with AUTOCKPT_FULL=1."""
    if os.environ.get("AUTOCKPT_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="long variant: AUTOCKPT_FULL=1")
    for item in items:
        if item.get_closest_marker("full") is not None:
            item.add_marker(skip)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: derived from AUTOCKPT_SEED and the test's name, so tests do not share draws."""
    return random.Random(f"{SEED}:{request.node.nodeid}").randrange(2**31)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.storage_options: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }

    def new_bucket(self) -> str:
        import botocore.session

        name = f"b-{uuid.uuid4().hex[:12]}"
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=name)
        return name


def start_moto(port: int) -> subprocess.Popen[bytes]:
    """A moto_server process serving S3 on 127.0.0.1:``port``, once it accepts connections (RuntimeError if not
    within 30 s). Used by the ``s3_server`` fixture, tests that stop and restart the server, and benchmarks."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: install the dev extra (moto[server])")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto_server process serving S3 on 127.0.0.1, for the whole session."""
    port = _free_port()
    try:
        proc = start_moto(port)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_url(s3_server: S3Server) -> tuple[str, dict[str, Any]]:
    """A fresh bucket: (url, storage_options)."""
    return f"s3://{s3_server.new_bucket()}/run", s3_server.storage_options


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(url, storage_options) on each kind of storage we support."""
    if request.param == "local":
        return str(tmp_path / "run"), {}
    if request.param == "memory":
        return f"memory://autockpt-tests/{uuid.uuid4().hex}", {}
    server: S3Server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/run", server.storage_options

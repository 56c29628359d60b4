"""Cloud preemption notices: a fake metadata service on 127.0.0.1 (real request/response shapes of AWS, GCP and
Azure), real processes, real signals. Nothing here ever talks to 169.254.169.254: every test points the watcher
at its own fake server, and conftest.py sets AUTOCKPT_CLOUD=none for all other tests."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autockpt
from autockpt.cloud_notice import AZURE_CHASSIS_ASSET_TAG, CloudNotice, CloudNoticeWatcher, detect_cloud
from autockpt.errors import InvalidArgumentError
from autockpt.preemption import PreemptionWatcher

sys.path.insert(0, str(Path(__file__).parent))
from fakemetadata import VM_NAME, FakeMetadata  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "cloud_train.py"
SRC = str(Path(__file__).parents[1] / "src")
AWS_PATH = "/latest/meta-data/spot/instance-action"
GCP_PATH = "/computeMetadata/v1/instance/preempted"
AZURE_PATH = "/metadata/scheduledevents"
NOTICE_PATH = {"aws": AWS_PATH, "gcp": GCP_PATH, "azure": AZURE_PATH}


@pytest.fixture
def fake() -> Iterator[FakeMetadata]:
    server = FakeMetadata()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def on_cloud(monkeypatch: pytest.MonkeyPatch, fake: FakeMetadata) -> Any:
    """Point the watcher at the fake server and say which cloud this is (as a user would, by environment)."""

    def set_cloud(cloud: str | None) -> FakeMetadata:
        if cloud is None:
            monkeypatch.delenv("AUTOCKPT_CLOUD", raising=False)
        else:
            monkeypatch.setenv("AUTOCKPT_CLOUD", cloud)
        monkeypatch.setenv("AUTOCKPT_METADATA_URL", fake.url)
        return fake

    return set_cloud


def _dmi(root: Path, **files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text + "\n")
    return root


def _set_notice(fake: FakeMetadata, cloud: str, vm: str = VM_NAME) -> None:
    if cloud == "aws":
        fake.set(aws_action={"action": "terminate", "time": "2026-12-02T00:32:00Z"})
    elif cloud == "gcp":
        fake.set(gcp_preempted=True)
    else:
        fake.set(azure_events=[{
            "EventId": "C1BF8322-4CBF-4FC4-9C45-B40CF3106D0E", "EventStatus": "Scheduled", "EventType": "Preempt",
            "ResourceType": "VirtualMachine", "Resources": [vm], "NotBefore": "Wed, 02 Dec 2026 00:32:00 GMT",
            "Description": "", "EventSource": "Platform", "DurationInSeconds": -1,
        }])


def _notice_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    """Notice threads started since ``before`` was taken and still running (earlier tests' may still be ending)."""
    return {t for t in threading.enumerate() if t.name == "autockpt-cloud-notice"} - before


# ---------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("files, expected", [
    ({"sys_vendor": "Amazon EC2", "product_name": "g5.xlarge", "bios_vendor": "Amazon EC2"}, "aws"),
    ({"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"}, "aws"),
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine", "bios_vendor": "Google"}, "gcp"),
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
      "chassis_asset_tag": AZURE_CHASSIS_ASSET_TAG}, "azure"),
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine", "chassis_asset_tag": "None"},
     None),  # Hyper-V on premises
    ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, None),
    ({}, None),  # a container without DMI files
])
def test_detect_cloud_from_dmi_files(tmp_path: Path, files: dict[str, str], expected: str | None) -> None:
    assert detect_cloud(_dmi(tmp_path / "dmi", **files)) == expected
    assert detect_cloud(tmp_path / "missing") is None


def test_bad_settings_raise_early_and_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOCKPT_CLOUD", "amazon")
    with pytest.raises(InvalidArgumentError, match="AUTOCKPT_CLOUD must be one of aws, gcp, azure, none"):
        PreemptionWatcher()
    PreemptionWatcher(cloud_notices=False)  # off: the variable is not read
    monkeypatch.setenv("AUTOCKPT_CLOUD", "aws")
    monkeypatch.setenv("AUTOCKPT_METADATA_URL", "https://169.254.169.254/latest")
    with pytest.raises(InvalidArgumentError, match=r"http://HOST\[:PORT\]"):
        PreemptionWatcher()
    with pytest.raises(InvalidArgumentError, match="cloud_notices must be True or False"):
        PreemptionWatcher(cloud_notices="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="poll_interval must be a positive number"):
        CloudNoticeWatcher(print, cloud="aws", metadata_url="http://127.0.0.1:1", poll_interval=0)


# ---------------------------------------------------------------------------------------------- off-cloud
@pytest.mark.parametrize("how", ["dmi-no-match", "env-none", "opt-out"])
def test_off_cloud_or_opted_out_sends_no_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_cloud: Any,
                                                 how: str) -> None:
    fake = on_cloud(None if how == "dmi-no-match" else "none" if how == "env-none" else "aws")
    vendor = "QEMU" if how == "dmi-no-match" else "Amazon EC2"  # env-none/opt-out win over a matching DMI
    monkeypatch.setenv("AUTOCKPT_DMI_ROOT", str(_dmi(tmp_path / "dmi", sys_vendor=vendor)))
    before = _notice_threads(set())
    with PreemptionWatcher(cloud_notices=how != "opt-out") as w:
        for _ in range(50):  # the detection thread (if any) ends at once off-cloud
            if not _notice_threads(before):
                break
            time.sleep(0.02)
        assert _notice_threads(before) == set()
        time.sleep(0.2)
        assert not w.triggered
    assert fake.requests == []


def test_dmi_detection_alone_starts_polling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            on_cloud: Any) -> None:
    fake = on_cloud(None)
    monkeypatch.setenv("AUTOCKPT_DMI_ROOT", str(_dmi(tmp_path / "dmi", sys_vendor="Amazon EC2")))
    with PreemptionWatcher() as w:
        fake.wait_for(AWS_PATH, 1)
        assert not w.triggered
    put = [r for r in fake.requests if r[0] == "PUT"]
    assert put and put[0][1] == "/latest/api/token" and put[0][2]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"


# ---------------------------------------------------------------------------------------------- no notice
@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_no_notice_means_nothing_happens(fake: FakeMetadata, cloud: str) -> None:
    seen: list[CloudNotice] = []
    if cloud == "azure":  # events that are not ours to act on: another VM's eviction, our own reboot
        _set_notice(fake, "azure", vm="other-vm_7")
        fake.set(azure_events=fake.azure_events + [{"EventId": "x", "EventType": "Reboot", "Resources": [VM_NAME],
                                                    "EventStatus": "Scheduled", "NotBefore": "x"}])
    w = CloudNoticeWatcher(seen.append, cloud=cloud, metadata_url=fake.url, poll_interval=0.05).start()
    try:
        fake.wait_for(NOTICE_PATH[cloud], 2 if cloud == "gcp" else 5)  # gcp: a plain GET, then a long poll
        assert seen == [] and w.notice is None
        if cloud == "aws":  # one token, reused by every poll
            assert fake.count("/latest/api/token") == 1
        if cloud == "gcp":
            assert "wait_for_change=true" in fake.requests[-1][1] and "last_etag=" in fake.requests[-1][1]
        _set_notice(fake, cloud)  # and the same watcher does see a notice when one comes
        for _ in range(200):
            if seen:
                break
            time.sleep(0.02)
        assert [n.cloud for n in seen] == [cloud]
    finally:
        w.stop()


def test_aws_refused_token_is_renewed_without_a_warning(fake: FakeMetadata,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[CloudNotice] = []
    w = CloudNoticeWatcher(seen.append, cloud="aws", metadata_url=fake.url, poll_interval=0.05).start()
    try:
        fake.wait_for(AWS_PATH, 2)
        fake.set(token="AQAEARotated==")  # the old token now gets HTTP 401, as an expired one would
        fake.wait_for("/latest/api/token", 2)
        _set_notice(fake, "aws")
        for _ in range(200):
            if seen:
                break
            time.sleep(0.02)
        assert [n.description for n in seen] == ["AWS spot interruption notice (terminate at 2026-12-02T00:32:00Z)"]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        w.stop()


# ---------------------------------------------------------------------------------------------- a bad service
@pytest.mark.parametrize("kind", ["down", "slow"])
def test_a_down_or_slow_service_never_reaches_training(fake: FakeMetadata, caplog: pytest.LogCaptureFixture,
                                                       kind: str) -> None:
    if kind == "down":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    else:
        url = fake.url
        fake.set(stall=1.0)  # longer than the request timeout
    seen: list[CloudNotice] = []
    caplog.set_level(logging.DEBUG, logger="autockpt")
    w = CloudNoticeWatcher(seen.append, cloud="aws", metadata_url=url, poll_interval=0.01, timeout=0.2).start()
    try:
        deadline = time.monotonic() + 10
        while sum("failed again" in r.getMessage() for r in caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings  # one warning, then quiet backoff
        assert "cannot read AWS's preemption notice" in warnings[0] and "AUTOCKPT_CLOUD=none" in warnings[0]
        assert sum("failed again" in r.getMessage() for r in caplog.records) >= 2
        assert seen == []
    finally:
        w.stop()


def test_install_does_not_wait_for_a_stalled_service(on_cloud: Any) -> None:
    fake = on_cloud("aws")
    fake.set(stall=3.0)
    t0 = time.perf_counter()
    w = PreemptionWatcher().install()
    took = time.perf_counter() - t0
    try:
        fake.wait_for("/latest/api/token", 1)  # the poll is under way (and hangs) while training goes on
        total = 0
        for i in range(1000):
            total += i
        assert total == 499500 and not w.triggered
    finally:
        w.uninstall()
    assert took < 1.0, f"install() took {took:.2f} s while the metadata service stalls 3 s"


# ---------------------------------------------------------------------------------------------- real signals
def test_notice_raises_sigterm_through_the_installed_handler(on_cloud: Any) -> None:
    fake = on_cloud("gcp")
    fake.set(gcp_preempted=True)
    with PreemptionWatcher() as w:
        for _ in range(250):
            if w.triggered:
                break
            time.sleep(0.02)
        assert w.received == signal.SIGTERM


def test_no_signal_without_an_installed_handler(on_cloud: Any) -> None:
    fake = on_cloud("gcp")
    before = _notice_threads(set())
    w = PreemptionWatcher()
    t = threading.Thread(target=w.install)  # outside the main thread nothing is installed: nothing may poll
    t.start()
    t.join()
    time.sleep(0.2)
    assert fake.requests == [] and _notice_threads(before) == set()
    w = PreemptionWatcher().install()
    fake.wait_for(GCP_PATH + "?wait_for_change=true", 1)  # the long poll hangs on the server
    w.uninstall()
    fake.set(gcp_preempted=True)  # the hanging poll returns TRUE after uninstall: it must be dropped
    for _ in range(50):
        if not _notice_threads(before):
            break
        time.sleep(0.02)
    assert _notice_threads(before) == set()  # the thread saw TRUE, and ended without a word
    assert not w.triggered and w.received is None  # (and this process, with SIG_DFL back, is still alive)


@pytest.mark.parametrize("cloud, says", [
    ("aws", "AWS spot interruption notice (terminate at 2026-12-02T00:32:00Z)"),
    ("gcp", "GCP preemption notice (instance/preempted is TRUE)"),
    ("azure", "Azure Preempt scheduled event (not before Wed, 02 Dec 2026 00:32:00 GMT)"),
], ids=["aws", "gcp", "azure"])
def test_notice_stops_a_real_run_after_saving(tmp_path: Path, fake: FakeMetadata, cloud: str, says: str) -> None:
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "AUTOCKPT_CLOUD": cloud, "AUTOCKPT_METADATA_URL": fake.url,
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        first = []
        for line in proc.stdout:  # training runs, and the service said "no notice" at least once
            first.append(line)
            if line.startswith("step 10"):
                break
        fake.wait_for(NOTICE_PATH[cloud], 1)
        _set_notice(fake, cloud)
        out, err = proc.communicate(timeout=60)
        out = "".join(first) + out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"autockpt: {says}: saving at the end of the current step and stopping" in err, err[-3000:]
    m = re.search(r"autockpt: SIGTERM: saved step (\d+) to (.+); stopping \(exit code 143\)", err)
    assert m, err[-3000:]
    saved = int(m.group(1))
    last_body = max(int(x) for x in re.findall(r"^step (\d+)$", out, re.M))
    assert saved == last_body + 1, (saved, last_body)  # the step in progress finished, was saved, nothing after
    assert autockpt.CheckpointManager(str(ckpt)).latest_step == saved
    np.testing.assert_array_equal(autockpt.load(str(ckpt))["w"], np.full(4, float(saved)))


def test_cloud_notices_false_passes_through_every_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A bad AUTOCKPT_CLOUD is read (and refused) only where cloud notices are on: so every entry point that
    accepts cloud_notices=False must hand it to its PreemptionWatcher (the Keras one also when fit starts)."""
    keras = pytest.importorskip("keras")
    keras_cb = pytest.importorskip("autockpt.integrations.keras").AutoCheckpoint
    lightning_cb = pytest.importorskip("autockpt.integrations.lightning").AutoCheckpoint
    hf_cb = pytest.importorskip("autockpt.integrations.transformers").AutoCheckpoint
    monkeypatch.setenv("AUTOCKPT_CLOUD", "amazon")
    makers = {"resume": lambda d, **k: autockpt.resume(d, **k), "keras": keras_cb, "lightning": lightning_cb,
              "transformers": hf_cb}
    for name, make in makers.items():
        with pytest.raises(InvalidArgumentError, match="AUTOCKPT_CLOUD must be one of"):
            make(str(tmp_path / name))  # notices on by default: the setting is checked at once
        with pytest.raises(InvalidArgumentError, match="cloud_notices must be True or False"):
            make(str(tmp_path / name), cloud_notices="yes")
        make(str(tmp_path / name), cloud_notices=False)  # off: the variable is not read
    with autockpt.resume(tmp_path / "loop", every_n_steps=2, cloud_notices=False) as run:
        for _ in run.steps(2):
            pass
    assert run.step == 2
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    cb = keras_cb(str(tmp_path / "fit"), cloud_notices=False)
    model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=1, batch_size=2, verbose=0, callbacks=[cb])
    assert cb.manager.latest_step == 2

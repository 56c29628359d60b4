"""What cloud preemption notices cost, and how early they arrive (a fake metadata service on 127.0.0.1).

    PYTHONPATH=src python benchmarks/cloud_notice.py

Reported:
- ``PreemptionWatcher`` install + uninstall time (median of 200), with notices off, off-cloud (DMI files that
  match no cloud: the thread starts, reads six small files and ends), and on AWS with a metadata service that
  stalls every answer for 3 s (install must not wait for it).
- Notice requests a watcher sends in its first 30 s while there is no notice, per cloud (AWS adds one token
  PUT per 6 h; GCP's count is the first plain GET plus one 60 s long poll).
- Time from a notice appearing on the service to ``watcher.triggered`` (the SIGTERM handler ran), per cloud,
  median of 5 (AWS and Azure poll every 5 s; GCP's long poll answers when the value flips).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from fakemetadata import VM_NAME, FakeMetadata  # noqa: E402

from autockpt.cloud_notice import CloudNoticeWatcher  # noqa: E402
from autockpt.preemption import PreemptionWatcher  # noqa: E402

PATHS = {"aws": "/latest/meta-data/spot/instance-action", "gcp": "/computeMetadata/v1/instance/preempted",
         "azure": "/metadata/scheduledevents"}


def install_cost(label: str, **kwargs: bool) -> None:
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        w = PreemptionWatcher(**kwargs).install()
        w.uninstall()
        times.append(time.perf_counter() - t0)
    print(f"install+uninstall, {label:<38} {statistics.median(times) * 1e6:8.0f} µs (max {max(times) * 1e3:.1f} ms)")


def notice(fake: FakeMetadata, cloud: str, on: bool) -> None:
    if cloud == "aws":
        fake.set(aws_action={"action": "terminate", "time": "2026-12-02T00:32:00Z"} if on else None)
    elif cloud == "gcp":
        fake.set(gcp_preempted=on)
    else:
        fake.set(azure_events=[{"EventId": "e", "EventType": "Preempt", "Resources": [VM_NAME],
                                "EventStatus": "Scheduled", "NotBefore": "soon"}] if on else [])


def main() -> None:
    fake = FakeMetadata()
    os.environ["AUTOCKPT_METADATA_URL"] = fake.url
    install_cost("notices off (cloud_notices=False)", cloud_notices=False)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "sys_vendor").write_text("QEMU\n")
        os.environ["AUTOCKPT_DMI_ROOT"] = d
        os.environ["AUTOCKPT_CLOUD"] = ""
        install_cost("off-cloud (DMI detection, no match)")
    assert fake.requests == [], "off-cloud sent a request"
    os.environ["AUTOCKPT_CLOUD"] = "aws"
    fake.set(stall=3.0)
    install_cost("AWS, metadata service stalls 3 s")
    fake.set(stall=0.0)
    while any(t.name == "autockpt-cloud-notice" for t in threading.enumerate()):
        time.sleep(0.1)  # the stopped watchers finish the request they had in flight, then end

    for cloud in ("aws", "gcp", "azure"):
        n0 = fake.count(PATHS[cloud])
        w = CloudNoticeWatcher(lambda n: None, cloud=cloud, metadata_url=fake.url).start()
        time.sleep(30)
        w.stop()
        print(f"{cloud:<5} notice requests in the first 30 s with no notice: {fake.count(PATHS[cloud]) - n0}")

    for cloud in ("aws", "gcp", "azure"):
        os.environ["AUTOCKPT_CLOUD"] = cloud
        delays = []
        for i in range(5):
            notice(fake, cloud, False)
            with PreemptionWatcher() as w:
                time.sleep(1.0 + i * 0.9)  # the notice lands at different points of the poll cycle
                notice(fake, cloud, True)
                t0 = time.perf_counter()
                while not w.triggered:
                    time.sleep(0.001)
                delays.append(time.perf_counter() - t0)
        print(f"{cloud:<5} notice -> SIGTERM handler: median {statistics.median(delays):.3f} s, "
              f"max {max(delays):.3f} s")
    fake.close()


if __name__ == "__main__":
    main()

"""Hearing the cloud's preemption notice: a daemon thread that polls the instance metadata service.

Spot/preemptible machines are told they will be taken away a little before it happens: AWS two minutes ahead
(``spot/instance-action``), Azure at least 30 s ahead (a ``Preempt`` scheduled event), GCP when the 30 s (up
to 120 s) shutdown window opens (``instance/preempted`` turns ``TRUE``). :class:`CloudNoticeWatcher` polls the
right endpoint and calls back once when a notice appears; ``PreemptionWatcher`` turns that callback into the
same path as a SIGTERM (it starts and stops one of these in ``install()``/``uninstall()``).

Cost off-cloud: nothing. The cloud is recognised WITHOUT network, from the DMI files the hypervisor exposes
(``/sys/class/dmi/id``) or from ``AUTOCKPT_CLOUD=aws|gcp|azure|none``; with no match, not one packet is sent.
Detection and polling run in a daemon thread, so start-up never waits; every request has a short timeout;
errors are logged (one WARNING, then DEBUG) and polling backs off; nothing here ever raises into training.

Endpoints and their real shapes (AWS EC2 User Guide "Spot Instance interruption notices" and IMDSv2; Google
Compute Engine "Detect if a Spot VM was preempted" and "wait for change"; Azure "Scheduled Events for Linux
VMs", api-version 2020-07-01):

- AWS: ``PUT /latest/api/token`` (``X-aws-ec2-metadata-token-ttl-seconds``), then
  ``GET /latest/meta-data/spot/instance-action`` (``X-aws-ec2-metadata-token``): 404 = no notice, 200 =
  ``{"action": "terminate"|"stop"|"hibernate", "time": "2026-...Z"}``. AWS recommends checking every 5 s.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` (``Metadata-Flavor: Google``): ``TRUE``/``FALSE``; then a
  long poll ``?wait_for_change=true&last_etag=...&timeout_sec=60`` that the server answers the moment it flips.
- Azure: ``GET /metadata/scheduledevents?api-version=2020-07-01`` (``Metadata: true``):
  ``{"DocumentIncarnation": n, "Events": [{"EventType": "Preempt", "Resources": [vm names], "NotBefore": ...}]}``.
  Events of the whole availability set / scale-set placement group are listed, so only those naming this VM
  count. The first call may take up to two minutes (the service is enabled by it), so it gets a long timeout.

One job: hearing the cloud's preemption notice. Imports only ``autockpt.errors``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autockpt.errors import InvalidArgumentError

log = logging.getLogger("autockpt")

CLOUDS = ("aws", "gcp", "azure")
_NAMES = {"aws": "AWS", "gcp": "GCP", "azure": "Azure"}
DEFAULT_METADATA_URL = "http://169.254.169.254"  # the link-local address of all three (no DNS lookup needed)
DEFAULT_DMI_ROOT = "/sys/class/dmi/id"
AZURE_CHASSIS_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
# AWS asks for a check every 5 s; Azure's 30 s minimum notice then keeps >= 25 s for the final save. GCP does not
# poll at this rate: its long poll returns the moment the value changes.
DEFAULT_POLL_INTERVAL_S = 5.0
DEFAULT_TIMEOUT_S = 2.0  # the metadata service is on the host: it answers in milliseconds or not at all
MAX_BACKOFF_S = 30.0  # while the service fails, polls space out up to this, still inside AWS's 2-minute notice
AWS_TOKEN_TTL_S = 21600  # the longest IMDSv2 allows (6 h); renewed a minute before it expires
GCP_LONG_POLL_S = 60
AZURE_FIRST_CALL_TIMEOUT_S = 130.0  # "expect a delayed response in your first call of up to two minutes"
_MAX_BODY = 1 << 20


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def detect_cloud(dmi_root: str | os.PathLike[str] | None = None) -> str | None:
    """The cloud this machine runs on, from its DMI files only (no network): ``"aws"``, ``"gcp"``, ``"azure"`` or None.

    ``dmi_root`` defaults to ``AUTOCKPT_DMI_ROOT`` or ``/sys/class/dmi/id``. Containers that hide ``/sys`` find
    nothing: set ``AUTOCKPT_CLOUD`` there instead (``CloudNoticeWatcher`` reads it before calling this).

    ```python
    from autockpt.cloud_notice import detect_cloud
    print(detect_cloud())  # None on a laptop
    ```
    """
    root = Path(dmi_root or os.environ.get("AUTOCKPT_DMI_ROOT") or DEFAULT_DMI_ROOT)
    f = {name: _read(root / name) for name in (
        "sys_vendor", "product_name", "bios_vendor", "bios_version", "board_vendor", "chassis_asset_tag")}
    if any(f[k].startswith("Amazon") for k in ("sys_vendor", "bios_vendor", "board_vendor")) or (
        "amazon" in f["bios_version"].lower()  # older Xen instances: sys_vendor "Xen", bios_version "4.11.amazon"
    ):
        return "aws"
    if f["sys_vendor"] == "Google" or f["product_name"] == "Google Compute Engine" or f["bios_vendor"] == "Google":
        return "gcp"
    if f["sys_vendor"] == "Microsoft Corporation" and f["chassis_asset_tag"] == AZURE_CHASSIS_ASSET_TAG:
        return "azure"  # Hyper-V elsewhere has the same vendor but not Azure's asset tag
    return None


def _cloud_setting(cloud: str | None) -> str:
    """``cloud`` or ``AUTOCKPT_CLOUD``: "aws", "gcp", "azure", "none", or "auto" (detect from DMI)."""
    source = "cloud"
    if cloud is None:
        cloud, source = os.environ.get("AUTOCKPT_CLOUD", ""), "AUTOCKPT_CLOUD"
    value = cloud.strip().lower() if isinstance(cloud, str) else cloud
    if value in ("", "auto"):
        return "auto"
    if value in CLOUDS or value == "none":
        return str(value)
    raise InvalidArgumentError(
        f"{source} must be one of aws, gcp, azure, none (or auto/empty to detect it from DMI), got {cloud!r}"
    )


def _check_url(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise InvalidArgumentError(
            f"metadata_url / AUTOCKPT_METADATA_URL must look like http://HOST[:PORT] (the metadata service's "
            f"root; the paths are added per cloud), got {url!r}"
        )
    try:
        port = parts.port or 80
    except ValueError as e:
        raise InvalidArgumentError(f"metadata_url {url!r} has a bad port: {e}") from None
    return parts.hostname, port


@dataclass(frozen=True)
class CloudNotice:
    """A preemption notice: which cloud, a one-line description for the log, and the raw answer."""

    cloud: str
    description: str
    raw: str


class _MetadataError(Exception):
    pass


class _Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: str) -> None:
        self.status, self.headers, self.body = status, headers, body


class CloudNoticeWatcher:
    """Polls the instance metadata service in a daemon thread; calls ``on_notice(notice)`` once, on a notice.

    Args:
        on_notice: called (from the watcher thread) with the :class:`CloudNotice`; polling then ends.
        cloud: "aws", "gcp", "azure", "none" or None: from ``AUTOCKPT_CLOUD``, else detected from DMI files.
        metadata_url: the service's root, ``http://HOST[:PORT]``; default ``AUTOCKPT_METADATA_URL`` or
            ``http://169.254.169.254``. Proxies are never used for it.
        dmi_root: where the DMI files are (default ``AUTOCKPT_DMI_ROOT`` or ``/sys/class/dmi/id``).
        poll_interval: seconds between polls (AWS, Azure); 5 s is AWS's own recommendation.
        timeout: seconds per request (a GCP long poll and Azure's first call get what they need).

    Off-cloud (nothing detected, or ``"none"``) ``start()`` sends no request; errors never reach the caller.

    ```python
    from autockpt.cloud_notice import CloudNoticeWatcher
    watcher = CloudNoticeWatcher(lambda notice: print(notice.description)).start()
    ...  # training; on a spot machine the callback runs when the notice appears
    watcher.stop()
    ```
    """

    def __init__(
        self,
        on_notice: Callable[[CloudNotice], None],
        *,
        cloud: str | None = None,
        metadata_url: str | None = None,
        dmi_root: str | os.PathLike[str] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not callable(on_notice):
            raise InvalidArgumentError(f"on_notice must be callable (it receives the notice), got {on_notice!r}")
        for name, value in (("poll_interval", poll_interval), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}")
        self.on_notice = on_notice
        self.setting = _cloud_setting(cloud)
        self.metadata_url = metadata_url or os.environ.get("AUTOCKPT_METADATA_URL") or DEFAULT_METADATA_URL
        self._host, self._port = _check_url(self.metadata_url)
        self.dmi_root = dmi_root
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)
        self.cloud: str | None = None  # what the thread detected (None until then, or off-cloud)
        self.notice: CloudNotice | None = None
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None

    def start(self) -> CloudNoticeWatcher:
        """Start the daemon thread (not at all when ``cloud`` is "none"); returns at once."""
        with self._lock:
            if self._stop is not None or self.setting == "none" or self.notice is not None:
                return self
            self._stop = threading.Event()
            threading.Thread(target=self._run, args=(self._stop,), name="autockpt-cloud-notice", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop polling; once this returns, ``on_notice`` is not called any more. Does not wait for the thread."""
        with self._lock:  # a callback in progress holds the lock: we return after it
            if self._stop is not None:
                self._stop.set()
                self._stop = None

    # ------------------------------------------------------------------------------------------ the thread
    def _run(self, stop: threading.Event) -> None:
        try:
            cloud = detect_cloud(self.dmi_root) if self.setting == "auto" else self.setting
        except Exception as e:  # never into training
            log.debug("autockpt: cloud detection failed: %r", e)
            cloud = None
        self.cloud = cloud
        if cloud is None:
            log.debug("autockpt: not on a known cloud; no preemption notices are polled")
            return
        provider = _Aws(self) if cloud == "aws" else _Gcp(self) if cloud == "gcp" else _Azure(self)
        poll = provider.poll
        log.debug("autockpt: polling the %s metadata service at %s for preemption notices", cloud,
                  self.metadata_url)
        failures = 0
        while not stop.is_set():
            try:
                notice, wait = poll()
            except Exception as e:  # a timeout, a refused connection, an unexpected answer: back off, retry
                failures += 1
                wait = min(MAX_BACKOFF_S, self.poll_interval * 2 ** min(failures, 10))
                if failures == 1:
                    log.warning("autockpt: cannot read %s's preemption notice from %s (%s); retrying every %.0f s or "
                                "less (AUTOCKPT_CLOUD=none turns this off)", _NAMES[cloud], self.metadata_url,
                                _describe(e), MAX_BACKOFF_S)
                else:
                    log.debug("autockpt: metadata poll failed again (%d in a row): %s", failures, _describe(e))
            else:
                if failures:
                    log.debug("autockpt: the metadata service answers again after %d failures", failures)
                failures = 0
                if notice is not None:
                    with self._lock:
                        if stop.is_set():
                            return
                        self.notice = notice
                        try:
                            self.on_notice(notice)
                        except Exception as e:
                            log.warning("autockpt: the preemption-notice callback failed: %r", e)
                        self._stop = None
                    return
            stop.wait(wait)

    def _request(self, method: str, path: str, headers: dict[str, str], timeout: float | None = None) -> _Response:
        """One HTTP request straight to the metadata service (never through a proxy), with a timeout."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout or self.timeout)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read(_MAX_BODY).decode("utf-8", errors="replace")
            return _Response(resp.status, resp.headers, body)
        finally:
            conn.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer within the timeout"
    return str(e) or type(e).__name__


class _Aws:
    PATH = "/latest/meta-data/spot/instance-action"

    def __init__(self, w: CloudNoticeWatcher) -> None:
        self.w = w
        self.token: str | None = None
        self.expires = 0.0

    def poll(self) -> tuple[CloudNotice | None, float]:
        for _ in range(2):  # a second time with a fresh token if the old one was refused
            if self.token is None or time.monotonic() > self.expires:
                r = self.w._request("PUT", "/latest/api/token",
                                    {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
                if r.status != 200 or not r.body.strip():
                    raise _MetadataError(f"PUT /latest/api/token answered HTTP {r.status}")
                self.token, self.expires = r.body.strip(), time.monotonic() + AWS_TOKEN_TTL_S - 60
            r = self.w._request("GET", self.PATH, {"X-aws-ec2-metadata-token": self.token})
            if r.status == 401:
                self.token = None
                continue
            if r.status == 404:  # no interruption scheduled
                return None, self.w.poll_interval
            if r.status != 200:
                raise _MetadataError(f"GET {self.PATH} answered HTTP {r.status}")
            data = _json(r.body, self.PATH)
            action, when = data.get("action", "?"), data.get("time", "?")
            return CloudNotice("aws", f"AWS spot interruption notice ({action} at {when})", r.body), 0.0
        raise _MetadataError("the IMDSv2 token was refused twice (HTTP 401)")


class _Gcp:
    PATH = "/computeMetadata/v1/instance/preempted"
    HEADERS = {"Metadata-Flavor": "Google"}

    def __init__(self, w: CloudNoticeWatcher) -> None:
        self.w = w
        self.etag: str | None = None

    def poll(self) -> tuple[CloudNotice | None, float]:
        if self.etag is None:
            r = self.w._request("GET", self.PATH, self.HEADERS)
        else:  # hangs on the server until the value changes (or GCP_LONG_POLL_S pass)
            query = urllib.parse.urlencode({"wait_for_change": "true", "last_etag": self.etag,
                                            "timeout_sec": GCP_LONG_POLL_S})
            r = self.w._request("GET", f"{self.PATH}?{query}", self.HEADERS, timeout=GCP_LONG_POLL_S + self.w.timeout)
        if r.status != 200:
            raise _MetadataError(f"GET {self.PATH} answered HTTP {r.status}")
        if r.headers.get("Metadata-Flavor") != "Google":  # what Google's own clients check, too
            raise _MetadataError("the answer lacks the 'Metadata-Flavor: Google' header: not the GCE metadata server")
        value = r.body.strip().upper()
        if value == "TRUE":
            return CloudNotice("gcp", "GCP preemption notice (instance/preempted is TRUE)", r.body), 0.0
        if value != "FALSE":
            raise _MetadataError(f"GET {self.PATH} answered {r.body[:100]!r}, expected TRUE or FALSE")
        self.etag = r.headers.get("ETag") or None
        # with an ETag the next request is a long poll: a short pause only guards against a server that does not wait
        return None, (1.0 if self.etag else self.w.poll_interval)


class _Azure:
    PATH = "/metadata/scheduledevents?api-version=2020-07-01"
    HEADERS = {"Metadata": "true"}
    TYPES = ("Preempt", "Terminate")  # Spot eviction; scale-set deletion with terminate notifications

    def __init__(self, w: CloudNoticeWatcher) -> None:
        self.w = w
        self.first = True
        self.names: set[str] | None = None

    def poll(self) -> tuple[CloudNotice | None, float]:
        r = self.w._request("GET", self.PATH, self.HEADERS,
                            timeout=AZURE_FIRST_CALL_TIMEOUT_S if self.first else None)
        if r.status != 200:
            raise _MetadataError(f"GET {self.PATH} answered HTTP {r.status}")
        self.first = False
        events = _json(r.body, self.PATH).get("Events")
        if not isinstance(events, list):
            raise _MetadataError(f"GET {self.PATH}: no Events list in {r.body[:200]!r}")
        for ev in events:
            if isinstance(ev, dict) and ev.get("EventType") in self.TYPES and self._mine(ev.get("Resources")):
                desc = f"Azure {ev['EventType']} scheduled event (not before {ev.get('NotBefore') or '?'})"
                return CloudNotice("azure", desc, r.body), 0.0
        return None, self.w.poll_interval

    def _mine(self, resources: Any) -> bool:
        """Whether an event concerns this VM (events of the whole scale set / availability set are listed)."""
        if not resources:
            return True
        if self.names is None:
            self.names = {socket.gethostname().lower()}
            try:
                r = self.w._request("GET", "/metadata/instance/compute/name?api-version=2021-02-01&format=text",
                                    self.HEADERS)
                if r.status == 200 and r.body.strip():
                    self.names.add(r.body.strip().lower())
            except Exception as e:
                log.debug("autockpt: could not read this VM's name from the metadata service: %r", e)
        return any(isinstance(n, str) and n.lower() in self.names for n in resources)


def _json(body: str, path: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise _MetadataError(f"GET {path} answered something that is not JSON: {body[:100]!r}") from None
    if not isinstance(data, dict):
        raise _MetadataError(f"GET {path} answered {body[:100]!r}, expected a JSON object")
    return data

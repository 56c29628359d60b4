"""A fake instance metadata service on 127.0.0.1 that speaks AWS's, GCP's and Azure's real request/response shapes.

- AWS IMDSv2: ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600) and returns a
  token; ``GET /latest/meta-data/spot/instance-action`` needs ``X-aws-ec2-metadata-token`` (401 otherwise) and
  answers 404 until a notice is set, then ``{"action": ..., "time": ...}``.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google`` (403 otherwise) and
  answers ``TRUE``/``FALSE`` with ``Metadata-Flavor: Google`` and an ``ETag``; with ``wait_for_change=true`` and
  the current ``last_etag`` it hangs until the value changes or ``timeout_sec`` pass.
- Azure: ``GET /metadata/scheduledevents?api-version=...`` needs ``Metadata: true`` (400 otherwise) and answers
  ``{"DocumentIncarnation": n, "Events": [...]}``; ``/metadata/instance/compute/name?...&format=text`` the VM name.

Every request is recorded (method, path, headers), so a test can count them, including "none at all".
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VM_NAME = "spot-vm_3"


class FakeMetadata:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.cond = threading.Condition()
        self.aws_action: dict[str, str] | None = None  # None: 404, no notice
        self.gcp_preempted = False
        self.azure_events: list[dict[str, Any]] = []
        self.stall = 0.0  # seconds each request waits before it is answered
        self.token = "AQAEAFake-token=="
        self.closing = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

            def do_GET(self) -> None:
                fake._handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ test side
    def set(self, **changes: Any) -> None:
        with self.cond:
            for k, v in changes.items():
                setattr(self, k, v)
            self.cond.notify_all()

    def count(self, path_prefix: str = "") -> int:
        with self.cond:
            return sum(1 for _, p, _ in self.requests if p.startswith(path_prefix))

    def wait_for(self, path_prefix: str, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(path_prefix) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} requests to {path_prefix} within {timeout} s: {self.requests}")
            time.sleep(0.02)

    def close(self) -> None:
        self.set(closing=True)
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------ server side
    def _gcp_value(self) -> tuple[str, str]:
        value = "TRUE" if self.gcp_preempted else "FALSE"
        return value, hashlib.sha1(value.encode()).hexdigest()[:16]

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self.cond:
            self.requests.append((method, h.path, headers))
            stall = self.stall
        if stall:
            time.sleep(stall)
        extra: dict[str, str] = {}
        if method == "PUT" and url.path == "/latest/api/token":
            ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            status, body = (200, self.token) if ttl.isdigit() and 1 <= int(ttl) <= 21600 else (400, "")
        elif method == "GET" and url.path == "/latest/meta-data/spot/instance-action":
            if headers.get("x-aws-ec2-metadata-token") != self.token:
                status, body = 401, ""
            elif self.aws_action is None:
                status, body = 404, ""
            else:
                status, body = 200, json.dumps(self.aws_action)
        elif method == "GET" and url.path == "/computeMetadata/v1/instance/preempted":
            if headers.get("metadata-flavor") != "Google":
                status, body = 403, ""
            else:
                with self.cond:
                    if query.get("wait_for_change") == "true":
                        deadline = time.monotonic() + float(query.get("timeout_sec", "300"))
                        while (query.get("last_etag") == self._gcp_value()[1] and not self.closing
                               and time.monotonic() < deadline):
                            self.cond.wait(0.05)
                    body, etag = self._gcp_value()
                status = 200
                extra = {"Metadata-Flavor": "Google", "ETag": etag}
        elif method == "GET" and url.path.startswith("/metadata/"):
            if headers.get("metadata") != "true" or "api-version" not in query:
                status, body = 400, json.dumps({"error": "Bad request. Required metadata header not specified"})
            elif url.path == "/metadata/scheduledevents":
                with self.cond:
                    events = list(self.azure_events)
                status, body = 200, json.dumps({"DocumentIncarnation": len(events), "Events": events})
            elif url.path == "/metadata/instance/compute/name" and query.get("format") == "text":
                status, body = 200, VM_NAME
            else:
                status, body = 404, ""
        else:
            status, body = 404, ""
        data = body.encode()
        try:
            h.send_response(status)
            for k, v in extra.items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            pass  # the client gave up (its timeout): that is what some tests do

"""A fault-injecting HTTP proxy on 127.0.0.1, between autockpt (s3fs) and a real S3-compatible server.

It forwards every request to the upstream server and, seeded and bounded, injects faults:

- ``fail_rate``: that fraction of requests fails: an HTTP 500 or 503 answer, a connection dropped before any
  answer, or an answer delayed past the client's read timeout (the request does reach the server: the client
  only sees a timeout, like a lost response);
- ``arm(pid, n)``: SIGKILL process ``pid`` at its ``n``-th request, before forwarding it (the request is
  lost) or after (it landed, its answer is lost): crash points land exactly in payload PUTs (each part of a
  multipart upload: ``part_of`` names which), the manifest PUT, the DELETEs of pruning. With ``sig=SIGSTOP``
  the process is paused there instead, and the request goes on normally (its answer waits for SIGCONT);
- ``stall(n, kind)``: the ``n``-th request of ``kind`` (every one from then on with ``every=True``) is
  forwarded and then never answered: the client sees a stalled request until its read timeout.

Counts of requests and of injected faults, by kind, are kept in ``stats``. The proxy stops by itself after
``max_seconds`` or ``max_requests``.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


def classify(method: str, path: str) -> str:
    """What an S3 request of autockpt does, from its method and path."""
    p = urlsplit(path).path
    if method == "PUT" and p.endswith("manifest.json"):
        return "manifest PUT"
    if method in ("PUT", "POST") and p.endswith(".safetensors"):
        return "payload PUT"
    if method in ("PUT", "POST") and ".autockpt-lease" in p:
        return "lease PUT"
    if method == "DELETE" or (method == "POST" and "delete" in urlsplit(path).query):
        return "DELETE"
    if method in ("PUT", "POST"):
        return "other write"
    return "read/list"


def part_of(method: str, path: str) -> str:
    """Which request of a (multipart) upload this is (``[multipart start]``, ``[part N]``, ``[multipart
    complete]``), or what a DELETE removes (``[checkpoint]``, ``[lease or probe]``); else ``""``."""
    query = urlsplit(path).query
    if method == "POST" and "uploads" in query.split("&"):
        return "[multipart start]"
    if method == "PUT" and "partNumber=" in query:
        return f"[part {query.split('partNumber=')[1].split('&')[0]}]"
    if method == "POST" and "uploadId=" in query:
        return "[multipart complete]"
    if classify(method, path) == "DELETE":
        return "[lease or probe]" if ".autockpt-" in path else "[checkpoint]"
    return ""


class FaultProxy:
    def __init__(self, upstream: str, fail_rate: float = 0.0, seed: int = 0, delay_s: float = 3.0,
                 max_faults: int = 10**6, max_requests: int = 10**6, max_seconds: float = 1800.0) -> None:
        u = urlsplit(upstream)
        self.up_host, self.up_port = u.hostname or "127.0.0.1", u.port or 80
        self.fail_rate = fail_rate
        self.rng = random.Random(seed)
        self.delay_s = delay_s
        self.max_faults = max_faults
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.kill_pid: int | None = None
        self.kill_at = 0
        self.kill_after_forward = False
        self.kill_kind: str | None = None
        self.kill_sig = signal.SIGKILL
        self.stall_kind: str | None = None
        self.stall_at = 0
        self.stall_every = False
        self.stalled = 0  # requests stalled so far
        self.counted = 0
        self.killed: str | None = None  # what the killing request was
        self.trace: list[str] = []  # the kind of every request, in order
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()
                kind = classify(self.command, self.path)
                fault, kill = proxy._decide(kind)
                what = f"{kind} {part_of(self.command, self.path)}".strip()
                if kill is not None and proxy.kill_sig != signal.SIGKILL:
                    proxy._kill(kill, what)  # paused, not killed: the request goes on
                    kill = None
                if kill is not None and not proxy.kill_after_forward:
                    proxy._kill(kill, what)
                    self.close_connection = True
                    return
                if fault in ("500", "503"):
                    code = int(fault)
                    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>"
                           f"{'InternalError' if code == 500 else 'SlowDown'}</Code><Message>injected</Message>"
                           f"</Error>").encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if fault == "drop":
                    self.close_connection = True
                    return
                status, headers, data = proxy._forward(self.command, self.path, body, self.headers)
                if kill is not None:
                    proxy._kill(kill, what)
                    self.close_connection = True
                    return
                if fault == "timeout":
                    time.sleep(proxy.delay_s)
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)  # a HEAD's Content-Length is the object's size: passed on
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._timer = threading.Timer(max_seconds, self.stop)
        self._timer.daemon = True

    def _decide(self, kind: str) -> tuple[str | None, int | None]:
        with self.lock:
            self.stats["requests"] += 1
            self.stats[f"requests: {kind}"] += 1
            self.trace.append(kind)
            if self.stats["requests"] > self.max_requests:
                return "503", None
            if self.kill_pid is not None and self.kill_kind in (None, kind):
                self.counted += 1
                if self.counted == self.kill_at:
                    pid, self.kill_pid = self.kill_pid, None
                    return None, pid
            if self.stall_kind == kind:
                self.stall_at -= 1
                if self.stall_at <= 0 and (self.stall_every or self.stall_at == 0):
                    self.stalled += 1
                    return "timeout", None
            if self.fail_rate and self.stats["faults"] < self.max_faults and self.rng.random() < self.fail_rate:
                fault = self.rng.choice(["500", "503", "drop", "timeout"])
                self.stats["faults"] += 1
                self.stats[f"fault: {fault}"] += 1
                return fault, None
        return None, None

    def _kill(self, pid: int, kind: str) -> None:
        when = "after" if self.kill_after_forward and self.kill_sig == signal.SIGKILL else "before"
        self.killed = f"{kind} ({when} it reached the server)"
        try:
            os.kill(pid, self.kill_sig)
        except ProcessLookupError:
            pass

    def _forward(self, method: str, path: str, body: bytes, headers: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.up_host, self.up_port, timeout=60)
        try:
            hdrs = {k: v for k, v in headers.items() if k.lower() not in HOP}
            if body or method in ("PUT", "POST"):
                hdrs["Content-Length"] = str(len(body))
            conn.request(method, path, body=body or None, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def arm(self, pid: int, at: int, after_forward: bool = False, kind: str | None = None,
            sig: int = signal.SIGKILL) -> None:
        """SIGKILL (or ``sig``) ``pid`` at the ``at``-th request from now (counting only requests of ``kind``)."""
        with self.lock:
            self.kill_pid, self.kill_at, self.kill_after_forward, self.counted = pid, at, after_forward, 0
            self.kill_kind, self.kill_sig = kind, sig
            self.killed = None

    def stall(self, at: int, kind: str, every: bool = False) -> None:
        """Forward the ``at``-th request of ``kind`` from now (and, with ``every``, all later ones), then answer
        nothing for ``delay_s`` and drop the connection: a stalled request, as the client sees it."""
        with self.lock:
            self.stall_kind, self.stall_at, self.stall_every = kind, at, every

    def unstall(self) -> None:
        with self.lock:
            self.stall_kind = None

    def disarm(self) -> None:
        with self.lock:
            self.kill_pid = None

    def start(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def s3_options(endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
    """s3fs storage options pointing at ``endpoint`` (the proxy), with short timeouts."""
    return {
        "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 2}},
        "skip_instance_cache": True,
    }

"""A loopback HTTP server that serves files, or forwards to an upstream (the moto S3 server), with scripted faults.

    with FaultServer(files={"/img/a.jpg": data}, upstream="http://127.0.0.1:PORT") as server:
        server.fail("/img/a.jpg", ["503", "reset"])     # the next two requests for it fail, then it is served
        server.fail("/bucket/x.tar", ["503"] * 1000)   # fails for as long as the test wants; server.clear() ends it

Faults (what a real network and store do): "503" (an S3 SlowDown / overloaded web server), "reset" (the connection
is closed without a response), "cut" (headers and half the body, then the connection is closed), "slow" (no
response until the client's timeout has passed), "404". Only the faults are fake; the clients (urllib, s3fs,
botocore) and the store are the real ones.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class _Server(ThreadingHTTPServer):
    # A web server's accept queue: socketserver's 5 drops connections of 32 threads at once (the kernel caps it at
    # net.core.somaxconn, 4096 since Linux 5.4, 128 before).
    request_queue_size = 1024


class FaultServer:
    def __init__(self, files: dict[str, bytes] | None = None, upstream: str | None = None, slow_s: float = 3.0):
        self.files, self.upstream, self.slow_s = dict(files or {}), upstream, slow_s
        self.faults: dict[str, list[str]] = {}
        self.requests: dict[str, int] = {}
        self.down_after: int | None = None  # an outage: every request after this many answers 503
        self.headers: dict[str, list[tuple[str, str]]] = {}  # path -> response headers a file is served with
        self.agents: set[str] = set()  # User-Agent headers of the requests
        self.served = 0  # requests in all
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FaultServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, path: str, faults: list[str]) -> None:
        with self.lock:
            self.faults[path] = list(faults)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _next_fault(self, method: str, path: str, agent: str | None) -> str | None:
        with self.lock:
            self.agents.add(agent or "")
            self.requests[path] = self.requests.get(path, 0) + 1
            self.served += 1
            if self.down_after is not None and self.served > self.down_after:
                return "503"
            queue = self.faults.get(path)
            # Only reads fail: a failed upload would test the writer's retries, not the reader's.
            return queue.pop(0) if queue and method in ("GET", "HEAD") else None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if h.command in ("PUT", "POST") else b""
        fault = self._next_fault(h.command, path, h.headers.get("User-Agent"))
        if fault == "reset":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "slow":
            time.sleep(self.slow_s)
            h.close_connection = True
            return
        if fault in ("503", "404"):
            payload = _SLOWDOWN if fault == "503" else b"not found"
            h.send_response(int(fault))
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":  # a HEAD response has no body: bytes written would garble the next response
                h.wfile.write(payload)
            return
        status, headers, payload = self._serve(h, path, body)
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        # A HEAD carries the size of what a GET would send (the upstream's header), not of its own empty body.
        upstream_length = next((v for k, v in headers if k.lower() == "content-length"), None)
        h.send_header("Content-Length", upstream_length if h.command == "HEAD" and upstream_length is not None
                      else str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            if fault == "cut":
                h.wfile.write(payload[: len(payload) // 2])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.wfile.write(payload)

    def _serve(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> tuple[int, list, bytes]:
        if path in self.files:
            return 200, [("Content-Type", "application/octet-stream"), *self.headers.get(path, [])], self.files[path]
        if self.upstream is None:
            return 404, [], b"not found"
        up = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection",)}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            r = conn.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            conn.close()


def crashing_task(task: tuple[int, str]) -> int:
    """A local-pool task (importable by spawned workers): x * 2, except that a worker running x == 3 dies as a
    decoder segfault or the OOM killer would take it (no exception, no cleanup), and x == 5 dies the first time only
    (the marker file `task[1]` says it has)."""
    import os

    x, marker = task
    if x == 3 or (x == 5 and not os.path.exists(marker)):
        if x == 5:
            open(marker, "w").close()
        os._exit(139)
    return x * 2


def dying_worker(task: int) -> int:
    """A local-pool task (importable by spawned workers) whose worker process dies right after returning its
    result: task 0 returns 0, then the process exits (a worker killed while idle)."""
    import os
    import threading

    if task == 0:
        threading.Timer(0.2, lambda: os._exit(137)).start()
    return task

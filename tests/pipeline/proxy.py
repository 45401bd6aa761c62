"""A TCP proxy in front of the loopback S3 server that injects network faults (cut connections, slow objects)."""

from __future__ import annotations

import re
import socket
import threading
import time
from urllib.parse import urlparse

_DENIED_BODY = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                b"<Message>Access Denied</Message></Error>")
_DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n" % len(_DENIED_BODY) + _DENIED_BODY)


class FlakyProxy:
    """Loopback TCP proxy to the S3 server, with three faults of a real object store:
    - an outage: connections number `first_bad` to `last_bad` are cut after `cut_after` response bytes (the client
      sees a reset mid-body);
    - a slow object: every request whose first line contains `slow_path` is held `slow_s` seconds before it is
      passed on (a throttled prefix, or a replica far away);
    - a refused stretch: every ranged read of `fail_path` from byte `fail_from` on is answered 403 AccessDenied, for
      as long as the proxy runs (what a job sees between its session token's expiry and the refresh); s3fs and the
      loader do not retry it, so a test pays no backoff for it."""

    def __init__(self, target: str, first_bad: int = 3, last_bad: int = 14, cut_after: int = 3000,
                 slow_path: str | None = None, slow_s: float = 0.0, fail_path: str | None = None,
                 fail_from: int = 0):
        u = urlparse(target)
        self.target, self.bad, self.cut_after = (u.hostname, u.port), range(first_bad, last_bad + 1), cut_after
        self.slow_path, self.slow_s = (slow_path.encode() if slow_path else None), slow_s
        self.fail_path, self.fail_from, self.failed = (fail_path.encode() if fail_path else None), fail_from, 0
        self.requests: list[tuple[float, bytes]] = []  # (time, first line) of each request seen
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = self.cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections in self.bad else None
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, None, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None, requests: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                line = data.split(b"\r\n", 1)[0] if requests else b""
                if line[:4] in (b"GET ", b"HEAD", b"PUT ", b"POST"):
                    self.requests.append((time.monotonic(), line))
                if self.slow_path is not None and self.slow_path in line:
                    time.sleep(self.slow_s)
                if self.fail_path is not None and self.fail_path in line:
                    start = re.search(rb"(?i)\r\nrange: bytes=(\d+)-", data)
                    if start and int(start.group(1)) >= self.fail_from:
                        self.failed += 1
                        src.sendall(_DENIED)
                        break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    self.cut += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()

"""A loopback HTTP server for the download tests (127.0.0.1 only, bounded, self-stopping).

``LoopbackServer(files)`` serves ``files`` (URL path -> local file or bytes) with:

* single byte ranges (``Range: bytes=a-b`` / ``a-``) answered 206 with Content-Range, and
  ``Accept-Ranges: bytes`` on every answer, HEAD included;
* ``no_ranges=True``: ranges are ignored (200, whole body, no Accept-Ranges), like a server
  without range support;
* ``drop[path] = (k, n)``: the first ``k`` GETs of ``path`` send the headers (full
  Content-Length) and only ``n`` body bytes, then close the connection (a dropped download);
* ``short_length[path] = n``: a GET without a Range header announces Content-Length ``n``
  and sends the first ``n`` bytes (a proxy that cut the file); ranged requests see the whole
  file;
* ``no_length``: paths answered without Content-Length, the body ending when the connection
  closes (an HTTP/1.0-style body whose truncation cannot be seen);
* accounting: ``body_bytes[path]`` (body bytes actually written) and ``requests`` (method,
  path, Range header) for assertions such as "only the needed members were read".

It stops itself after ``max_seconds`` so a hung test never leaves a thread behind; use it
as a context manager.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class LoopbackServer:
    def __init__(self, files: dict[str, Path | bytes] | None = None, *, no_ranges: bool = False,
                 max_seconds: float = 120.0):
        self.files: dict[str, Path | bytes] = dict(files or {})
        self.no_ranges = no_ranges
        self.drop: dict[str, tuple[int, int]] = {}
        self.short_length: dict[str, int] = {}
        self.no_length: set[str] = set()
        self.body_bytes: dict[str, int] = defaultdict(int)
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(max_seconds, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def total_body_bytes(self) -> int:
        return sum(self.body_bytes.values())

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _body(self) -> bytes | None:
                src = srv.files.get(self.path.split("?", 1)[0])
                if src is None:
                    return None
                return src if isinstance(src, bytes) else Path(src).read_bytes()

            def _answer(self, head_only: bool) -> None:
                rng = self.headers.get("Range")
                with srv._lock:
                    srv.requests.append((self.command, self.path, rng))
                body = self._body()
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end, status = 0, len(body), 200
                m = _RANGE.match(rng or "")
                if rng and not srv.no_ranges and m:
                    a, b = m.groups()
                    start = int(a) if a else max(0, len(body) - int(b or 0))
                    end = min(len(body), int(b) + 1) if (a and b) else len(body)
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                if not rng and self.path in srv.short_length:
                    end = min(end, srv.short_length[self.path])
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if self.path in srv.no_length:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(end - start))
                if not srv.no_ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
                self.end_headers()
                if head_only:
                    return
                payload = body[start:end]
                with srv._lock:
                    k, n = srv.drop.get(self.path, (0, 0))
                    if k > 0:
                        srv.drop[self.path] = (k - 1, n)
                        payload = payload[:n]
                        self.close_connection = True
                    # counted before writing, so a client that has its bytes sees the count
                    srv.body_bytes[self.path] += len(payload)
                try:
                    self.wfile.write(payload)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return

            def do_GET(self) -> None:
                self._answer(head_only=False)

            def do_HEAD(self) -> None:
                self._answer(head_only=True)

        return Handler

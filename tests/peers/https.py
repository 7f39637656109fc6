"""A tiny HTTPS server on loopback serving fixed files: the MTA-STS policy host of a test domain.

What it does: `running_https(files, cert)` serves `files` ({path: (content type, body)}) over
HTTPS with `cert` (a trustme issued certificate) in a thread on 127.0.0.1 and a free port, and
counts the requests; a path not in `files` is 404, and `redirect` paths answer 301.
Exposure: test-only; loopback only. Stopped (and its port closed) when the block exits.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import trustme


@dataclass
class HttpsPeer:
    host: str
    port: int
    files: dict[str, tuple[str, bytes]]
    requests: list[str] = field(default_factory=list)


@contextmanager
def running_https(files: Mapping[str, tuple[str, bytes]], cert: trustme.LeafCert) -> Iterator[HttpsPeer]:
    peer = HttpsPeer("127.0.0.1", 0, dict(files))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            peer.requests.append(self.path)
            found = peer.files.get(self.path)
            if found is None:
                self.send_error(404)
                return
            kind, body = found
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer((peer.host, 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    peer.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

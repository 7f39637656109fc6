"""The metrics endpoint: GET /metrics, /healthz and /readyz over HTTP/1.1, on the server's own loop.

Exposure: listens where `[metrics] listen` says, without authentication, so it belongs on
loopback or a private network (what it shows is operator-facing). `/metrics` is the registry of
`metrics.Metrics` (OpenMetrics when the Accept header asks for it); `/healthz` is 200 while the
process runs; `/readyz` is 200 when `ready()` finds nothing wrong, else 503 with its one-line
reason. Anything else: 404 (405 for a method other than GET/HEAD). Limits, so a scanner or a
stuck client costs little: a request's line and headers at most `MAX_REQUEST` octets (else
431), read within `READ_TIMEOUT`, one request per connection, at most `MAX_CONNECTIONS` at once
(more are closed unanswered). Failure: a slow, broken or vanished client ends its own
connection only; a bind failure is the caller's OSError (app.py makes it a ConfigError naming
`metrics.listen`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from maildetour.metrics import Metrics, exposition

log = logging.getLogger("maildetour.metrics")

# A scraper's request is a few hundred octets; 8 KiB takes any sane set of headers.
MAX_REQUEST = 8192
# Prometheus times a scrape out after 10 s by default; a client that has not sent its request
# by then will not. Writing the answer gets as long again.
READ_TIMEOUT = 10.0
# A scraper or two, a health checker, an operator's curl: more at once is somebody else.
MAX_CONNECTIONS = 8

Ready = Callable[[], str | None]  # None: ready; else why not, in one line

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"


class MetricsEndpoint:
    """One listening socket and its connections."""

    def __init__(self, metrics: Metrics, ready: Ready) -> None:
        self.metrics, self.ready = metrics, ready
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (0: a free port, see `address`). Raises OSError."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST,
                                                  reuse_address=True)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop listening and drop the connections still open."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    head = b""
                status, content_type, body, method = self._answer(head)
            async with asyncio.timeout(READ_TIMEOUT):
                writer.write(_response(status, content_type, b"" if method == "HEAD" else body, len(body)))
                await writer.drain()
                if status == 431:  # unread input would make our close a reset, lost answer and all
                    writer.write_eof()
                    await _discard(reader)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # gone, or too slow: nothing to answer
        except Exception:  # a bug must not end the server: logged, the connection dropped
            log.exception("metrics endpoint: unexpected error")
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, str, bytes, str]:
        """(status, content type, body, method) for one request's line and headers."""
        if not head:
            return 431, _TEXT, b"request too large\n", "GET"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, _TEXT, b"bad request\n", "GET"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"only GET\n", "GET"
        if path == "/metrics":
            accept = next((line.split(":", 1)[1] for line in lines[1:]
                           if line.lower().startswith("accept:")), "")
            body, content_type = exposition(self.metrics, accept)
            return 200, content_type, body, method
        if path == "/healthz":
            return 200, _TEXT, b"ok\n", method
        if path == "/readyz":
            problem = self.ready()
            if problem is None:
                return 200, _TEXT, b"ready\n", method
            return 503, _TEXT, f"not ready: {problem}\n".encode(), method
        return 404, _TEXT, b"not found\n", method


async def _discard(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client still sends, up to its end or a bounded amount."""
    left = 16 * MAX_REQUEST
    while left > 0 and (chunk := await reader.read(MAX_REQUEST)):
        left -= len(chunk)


def _response(status: int, content_type: str, body: bytes, length: int) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


async def start_endpoint(metrics: Metrics, ready: Ready, host: str, port: int) -> MetricsEndpoint:
    endpoint = MetricsEndpoint(metrics, ready)
    await endpoint.start(host, port)
    return endpoint

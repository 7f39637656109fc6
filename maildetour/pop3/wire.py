"""Turn a stored message into the octets of a POP3 RETR/TOP reply body, chunk by chunk.

Pure and incremental: bytes in, bytes out, no I/O, so a 25 MB message never sits in memory
whole. Every line end becomes CRLF, a line starting with "." gets another "." (RFC 1939 byte
stuffing), a last line without a line end gets CRLF, and `finish()` adds the ".\\r\\n"
terminator. For TOP, output stops after the header, the blank line and `body_lines` body lines;
`done` then tells the caller to stop reading. Exposure: the output goes to the client, but its
input is our own stored message. Fails never (any byte sequence is encoded).
"""

from __future__ import annotations

# A line longer than this is passed through in pieces instead of being buffered whole.
_FLUSH_AT = 64 * 1024


class MessageEncoder:
    __slots__ = ("_body_lines", "_in_body", "_sent_body_lines", "_partial", "_line_started",
                 "done")

    def __init__(self, body_lines: int | None = None) -> None:
        """`body_lines=None` sends everything (RETR); a number sends that many (TOP)."""
        self._body_lines = body_lines
        self._in_body = False
        self._sent_body_lines = 0
        self._partial = b""
        self._line_started = False  # part of the current line was already sent
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        out = bytearray()
        data = self._partial + chunk
        start = 0
        while not self.done:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._emit_line(out, line)
            start = end + 1
        rest = b"" if self.done else data[start:]
        if len(rest) > _FLUSH_AT:
            # Keep a trailing CR: it may be the first half of a CRLF split across chunks.
            keep = 1 if rest.endswith(b"\r") else 0
            piece = rest[: len(rest) - keep]
            out += self._stuff(piece)
            self._line_started = True
            rest = rest[len(rest) - keep:]
        self._partial = rest
        return bytes(out)

    def finish(self) -> bytes:
        """The rest of the message (an unterminated last line gets CRLF) and the terminator."""
        out = bytearray()
        if not self.done and (self._partial or self._line_started):
            out += self._stuff(self._partial) + b"\r\n"
        self._partial = b""
        self.done = True
        return bytes(out) + b".\r\n"

    def _emit_line(self, out: bytearray, line: bytes) -> None:
        out += self._stuff(line) + b"\r\n"
        whole_line_empty = not line and not self._line_started
        self._line_started = False
        if self._body_lines is None:
            return
        if self._in_body:
            self._sent_body_lines += 1
        elif whole_line_empty:
            self._in_body = True
        if self._in_body and self._sent_body_lines >= self._body_lines:
            self.done = True

    def _stuff(self, piece: bytes) -> bytes:
        if not self._line_started and piece.startswith(b"."):
            return b"." + piece
        return piece

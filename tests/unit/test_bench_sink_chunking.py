"""The bench's stand-in gmail speaks BDAT (RFC 3030) as Gmail's MX does, and `--no-chunking`
gives the stand-in without it: `python3 -m bench.sink` as a child, a raw socket on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from bench.proc import free_port, wait_port

MESSAGE = b"Subject: hi\r\nX-Bench-Seq: 7\r\n\r\n.a leading dot stays\r\n.\r\nend\r\n"


@contextmanager
def standin(*flags: str) -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "bench.sink", "--host", "127.0.0.1", "--port", str(port),
                             *flags], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        wait_port("127.0.0.1", port, timeout=5, alive=proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            yield sock, proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def replies(sock: socket.socket, send: bytes, count: int) -> list[bytes]:
    """Send `send`; read `count` replies (their last lines)."""
    sock.sendall(send)
    buffer, found = b"", list[bytes]()
    while len(found) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {found}"
        buffer += chunk
        while b"\r\n" in buffer:
            line, buffer = buffer.split(b"\r\n", 1)
            if line[3:4] != b"-":
                found.append(line)
    return found


def ehlo(sock: socket.socket) -> bytes:
    sock.recv(1024)  # the greeting
    sock.sendall(b"EHLO client.test\r\n")
    text = b""
    while not any(line[3:4] == b" " for line in text.split(b"\r\n")):
        text += sock.recv(4096)
    return text


ENVELOPE = b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@gmail.test>\r\n"


def test_bdat_chunks_make_the_message_and_last_is_judged_like_end_of_data() -> None:
    with standin() as (sock, proc):
        assert b"250-CHUNKING" in ehlo(sock)
        # Without a transaction the chunk is still read (not taken for a QUIT), then 503.
        assert replies(sock, b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n", 2) == [
            b"503 5.5.1 Error: need MAIL and RCPT command", b"250 OK"]
        head, tail = MESSAGE[:20], MESSAGE[20:]
        got = replies(sock, ENVELOPE + b"BDAT %d\r\n" % len(head) + head + b"BDAT %d LAST\r\n" % len(tail) + tail, 4)
        assert [r[:3] for r in got] == [b"250", b"250", b"250", b"250"] and b"accepted" in got[3]
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[1:] == [b"7", b"A"]
        # A refused message: 552 at BDAT LAST, then the session takes the next one.
        refused = b"X-Bench-Refuse: yes\r\n\r\nx\r\n"
        got = replies(sock, ENVELOPE + b"BDAT %d LAST\r\n" % len(refused) + refused, 3)
        assert got[2].startswith(b"552 5.7.0")
        assert proc.stdout.readline().split()[1:] == [b"-", b"R"]
        got = replies(sock, b"RSET\r\n" + ENVELOPE + b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE, 4)
        assert got[3].startswith(b"250 2.0.0 OK")
        assert proc.stdout.readline().split()[1:] == [b"7", b"A"]
        assert replies(sock, b"BDAT x\r\n", 1)[0].startswith(b"501")


def test_kept_message_is_the_chunks_as_sent(tmp_path: object) -> None:
    with standin() as (sock, proc):
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"keep 1 {tmp_path}\n".encode())
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"ok"
        ehlo(sock)
        replies(sock, ENVELOPE + b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE, 3)
        proc.stdout.readline()
    assert (tmp_path / "1.eml").read_bytes() == MESSAGE  # type: ignore[operator]


def test_no_chunking_is_the_old_stand_in() -> None:
    with standin("--no-chunking") as (sock, _):
        text = ehlo(sock)
        assert b"CHUNKING" not in text and b"250-PIPELINING" in text
        assert replies(sock, b"BDAT 0 LAST\r\n", 1)[0].startswith(b"500")

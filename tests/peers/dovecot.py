"""A private Dovecot IMAP server on loopback, with TLS from a test CA: the peer of `imap_out`,
and with `lmtp=True` also the mail store the LMTP agent hands mailbox copies to (issue 14).

What it does: `running_dovecot(...)` writes a Dovecot config into a fresh directory, runs
`dovecot -F` as a child of the test, waits for its ports, yields a `DovecotPeer`, and stops it
on exit. The instance has:
- an implicit-TLS listener (`imaps_port`) and a plain listener that offers STARTTLS
  (`imap_port`), both on 127.0.0.1 only; the certificate comes from a fresh `trustme` CA and
  names `cert_names` (default "localhost" and "127.0.0.1"); `ca_file` is the CA to trust;
- one passwd-file user (`user`, `password`; the default password has a space, a quote and a
  backslash), mail in Maildir under `base/mail/<user>`, owned by `nobody` (Dovecot refuses
  mail access as root; the tests run as root); a refused login is answered at once
  (`auth_failure_delay = 0`);
- with `quota="1k"`: the quota plugin with a storage limit, so a bigger APPEND gets
  `NO [OVERQUOTA]`; with `quotas={user: "1k"}` a limit for those users only (a userdb field
  in the passwd-file; LMTP then answers `552 5.2.2 <user> Quota exceeded`);
- `more_users`: more passwd-file users with the same password (a user not listed there gets
  `550 5.1.1 <user> User doesn't exist` at LMTP's RCPT);
- with `lmtp=True` (Debian `dovecot-lmtpd`): an LMTP listener on 127.0.0.1 (`lmtp_port`) and
  a Unix socket (`lmtp_socket`, by default `base/lmtp`; give a path to know it before Dovecot
  starts);
- with `oauth2_token="..."`: SASL XOAUTH2 and OAUTHBEARER through `passdb { driver = oauth2 }`,
  whose introspection URL is a tiny HTTP server in this process (a thread on loopback) that
  answers `{"active": true, "username": user}` for exactly that token and `{"active": false}`
  for anything else (the tokens it was asked about are in `introspected`).
Helpers read a mailbox back over IMAP with the stdlib client (TLS verified with the test CA;
it logs in with SASL LOGIN, so its logins are told apart from the agent's) or from its Maildir
files directly (`maildir_messages`), count the agent's logins in Dovecot's log, and end
sessions (`doveadm kick`).

Exposure: test-only; loopback only. Failure: a Dovecot that does not start is reported with
`peer_unavailable` (skip by hand, fail in CI) with its error output; a missing Dovecot with
`need`. Stopping: SIGTERM to the master we started, then SIGKILL to its process group.
"""

from __future__ import annotations

import http.server
import imaplib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.peers import need, peer_unavailable
from tests.peers.ports import free_port

_START_TIMEOUT = 15.0  # seconds for Dovecot to listen
_LOG_TIMEOUT = 5.0  # seconds for Dovecot's log process to write a line we wait for
_STOP_GRACE = 0.5  # seconds Dovecot gets to stop by itself before its processes are killed
HOST = "127.0.0.1"
LMTP_SERVICE = "/usr/lib/dovecot/lmtp"

_CONFIG = """\
protocols = imap{protocols}
listen = {host}
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
ssl = yes
ssl_cert = <{base}/tls/cert.pem
ssl_key = <{base}/tls/key.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
auth_verbose = yes
# A refused login is answered at once (Dovecot waits 2 s by default): tests stay fast.
auth_failure_delay = 0
mail_location = maildir:{base}/mail/%Lu
mail_plugins = $mail_plugins {mail_plugins}
protocol imap {{
  mail_plugins = $mail_plugins {imap_plugins}
}}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%Lu {base}/passwd
}}
{oauth2_passdb}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {base}/passwd
  default_fields = uid={uid} gid={gid} home={base}/home/%Lu
}}
service auth {{
  user = root
}}
{lmtp_service}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps_port}
    ssl = yes
  }}
}}
plugin {{
{plugin}
}}
"""

_LMTP_SERVICE = """\
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {port}
  }}
  unix_listener {socket} {{
    mode = 0666
  }}
}}
"""

_OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {base}/oauth2.conf.ext
}}
"""

_OAUTH2_CONF = """\
introspection_mode = post
introspection_url = http://{host}:{port}/introspect
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
"""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    data: bytes  # BODY.PEEK[]: the exact bytes stored
    internaldate: str  # as the server gives it, "17-Jul-1996 02:44:25 -0700"
    flags: str  # the FLAGS list as the server gives it, "(\\Recent)"


@dataclass(frozen=True, slots=True)
class DovecotPeer:
    """A running Dovecot: where it listens, who can log in, how to read what it stored."""

    host: str
    imaps_port: int  # implicit TLS
    imap_port: int  # plain, STARTTLS offered (LOGIN only after it)
    user: str
    password: str
    ca_file: Path  # PEM of the CA that issued the server's certificate
    base: Path
    config: Path
    log_path: Path
    introspected: list[str] = field(default_factory=list)  # tokens the oauth2 passdb asked about
    lmtp_port: int = 0  # with lmtp=True: LMTP on host:lmtp_port
    lmtp_socket: Path | None = None  # with lmtp=True: LMTP on this Unix socket

    def client(self, user: str | None = None) -> imaplib.IMAP4_SSL:
        """A logged-in stdlib client over implicit TLS, verified against `ca_file`, as `user`
        (default: `self.user`; every user has `password`). It logs in with SASL LOGIN (Dovecot
        logs "method=LOGIN"), so `logins()` can leave it out."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        client = imaplib.IMAP4_SSL(self.host, self.imaps_port, ssl_context=context, timeout=10)
        answers = iter((user or self.user, self.password))
        client.authenticate("LOGIN", lambda challenge: next(answers).encode())
        return client

    def messages(self, folder: str = "INBOX", user: str | None = None) -> list[StoredMessage]:
        """Every message in `folder` of `user` (default: `self.user`), in order, with its exact
        bytes, internal date and flags."""
        client = self.client(user)
        try:
            status, count = client.select(_quote(folder), readonly=True)
            assert status == "OK", f"cannot select {folder!r}"
            if count == [b"0"]:
                return []
            status, data = client.fetch("1:*", "(INTERNALDATE FLAGS BODY.PEEK[])")
            assert status == "OK", f"cannot fetch from {folder!r}"
            found = []
            for item in data:
                if not isinstance(item, tuple):
                    continue
                head, body = item
                date = re.search(rb'INTERNALDATE "([^"]+)"', head)
                flags = re.search(rb"FLAGS (\([^)]*\))", head)
                found.append(StoredMessage(body, date.group(1).decode() if date else "",
                                           flags.group(1).decode() if flags else ""))
            return found
        finally:
            client.logout()

    def maildir_messages(self, user: str | None = None) -> list[bytes]:
        """The bytes of every message in the INBOX of `user` (default: `self.user`), read from
        Dovecot's Maildir files directly (new/ and cur/; a message is there only once Dovecot
        renamed it from tmp/, so complete): cheap enough to poll for hundreds of messages."""
        root = self.base / "mail" / (user or self.user).lower()
        found = []
        for sub in ("new", "cur"):
            directory = root / sub
            if not directory.is_dir():
                continue
            for path in sorted(directory.iterdir()):
                try:
                    found.append(path.read_bytes())
                except FileNotFoundError:  # moved from new/ to cur/ meanwhile (an IMAP reader)
                    continue
        return found

    def create_folder(self, folder: str) -> None:
        client = self.client()
        try:
            assert client.create(_quote(folder))[0] == "OK"
        finally:
            client.logout()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logins(self) -> list[str]:
        """Dovecot's "imap-login: Login: user=<...>" lines so far (one per successful login),
        except those of `client()` (method=LOGIN)."""
        return [line for line in self.log().splitlines()
                if "imap-login: " in line and ": Login: user=<" in line
                and "method=LOGIN," not in line]

    def wait_logins(self, count: int, timeout: float = _LOG_TIMEOUT) -> list[str]:
        """Wait until the log shows at least `count` logins (its writer is a separate process)."""
        deadline = time.monotonic() + timeout
        while len(found := self.logins()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def kick(self) -> None:
        """End every IMAP session of `user` (`doveadm kick`: its imap processes get SIGTERM and
        close the connection); return once Dovecot has logged the disconnection."""
        before = self.log().count("Disconnected: ")
        done = subprocess.run([need("doveadm", "dovecot-core"), "-c", str(self.config), "kick",
                               self.user], capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, f"doveadm kick failed: {done.stderr.strip()}"
        deadline = time.monotonic() + _LOG_TIMEOUT
        while self.log().count("Disconnected: ") == before and time.monotonic() < deadline:
            time.sleep(0.02)


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextmanager
def running_dovecot(*, user: str = "ituki@gm.example.net", password: str = "pa ss\"word\\1",
                    cert_names: Sequence[str] = ("localhost", HOST), quota: str | None = None,
                    oauth2_token: str | None = None, more_users: Sequence[str] = (),
                    quotas: Mapping[str, str] | None = None, lmtp: bool = False,
                    lmtp_socket: Path | None = None) -> Iterator[DovecotPeer]:
    """Run a private Dovecot on 127.0.0.1 until the block exits (see the module header).

    `password` defaults to one with a space, a quote and a backslash: LOGIN must quote it.
    """
    program = need("dovecot", "dovecot-imapd")
    need("doveadm", "dovecot-core")
    if lmtp:
        need(LMTP_SERVICE, "dovecot-lmtpd")  # Debian's path of the lmtp service Dovecot runs
    if os.geteuid() != 0:
        peer_unavailable("the Dovecot peer runs Dovecot as root (privilege separation)")
    base = Path(tempfile.mkdtemp(prefix="maildetour-dovecot-"))
    base.chmod(0o755)  # the mail user (nobody) must reach base/mail
    introspected: list[str] = []
    http_server = _start_introspection(user, oauth2_token, introspected) if oauth2_token else None
    try:
        users = _Users([user, *more_users], password, dict(quotas or {}))
        peer = _write_config(base, users, cert_names, quota, http_server, introspected,
                             lmtp=lmtp, lmtp_socket=lmtp_socket)
        process = subprocess.Popen([program, "-F", "-c", str(peer.config)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            _wait_started(process, peer)
            yield peer
        finally:
            _stop(process)
    finally:
        if http_server is not None:
            http_server.shutdown()
            http_server.server_close()
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class _Users:
    names: list[str]  # the first is the peer's `user`
    password: str
    quotas: dict[str, str]  # user -> storage limit

    def passwd(self) -> str:
        """The passwd-file: every user with the password, and a quota rule where one is set."""
        lines = []
        for name in self.names:
            limit = self.quotas.get(name)
            extra = f"userdb_quota_rule=*:storage={limit}" if limit else ""
            lines.append(f"{name.lower()}:{{PLAIN}}{self.password}::::::{extra}\n")
        return "".join(lines)


def _write_config(base: Path, users: _Users, cert_names: Sequence[str],
                  quota: str | None, http_server: http.server.HTTPServer | None,
                  introspected: list[str], *, lmtp: bool, lmtp_socket: Path | None) -> DovecotPeer:
    mail_user = pwd.getpwnam("nobody")
    for name in ("run", "state", "tls", "mail", "home"):
        (base / name).mkdir()
    for name in ("mail", "home"):
        os.chown(base / name, mail_user.pw_uid, mail_user.pw_gid)
    ca = trustme.CA()
    issued = ca.issue_cert(*cert_names)
    issued.cert_chain_pems[0].write_to_path(str(base / "tls" / "cert.pem"))
    issued.private_key_pem.write_to_path(str(base / "tls" / "key.pem"))
    ca_file = base / "tls" / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    (base / "passwd").write_text(users.passwd())
    mechanisms, oauth2_passdb = "plain login", ""
    if http_server is not None:
        mechanisms += " xoauth2 oauthbearer"
        oauth2_passdb = _OAUTH2_PASSDB.format(base=base)
        (base / "oauth2.conf.ext").write_text(
            _OAUTH2_CONF.format(host=HOST, port=http_server.server_address[1]))
    plugin = ""
    quotas = quota is not None or bool(users.quotas)
    if quotas:
        plugin = "  quota = maildir:User quota\n"
    if quota is not None:
        plugin += f"  quota_rule = *:storage={quota}\n"
    imap_port, imaps_port = free_port(HOST), free_port(HOST)
    lmtp_port, lmtp_service = 0, ""
    if lmtp:
        lmtp_port = free_port(HOST)
        lmtp_socket = lmtp_socket or base / "lmtp"
        lmtp_service = _LMTP_SERVICE.format(host=HOST, port=lmtp_port, socket=lmtp_socket)
    config = base / "dovecot.conf"
    config.write_text(_CONFIG.format(
        host=HOST, base=base, uid=mail_user.pw_uid, gid=mail_user.pw_gid, imap_port=imap_port,
        imaps_port=imaps_port, mechanisms=mechanisms, oauth2_passdb=oauth2_passdb, plugin=plugin,
        mail_plugins="quota" if quotas else "", imap_plugins="imap_quota" if quotas else "",
        protocols=" lmtp" if lmtp else "", lmtp_service=lmtp_service))
    return DovecotPeer(HOST, imaps_port, imap_port, users.names[0], users.password, ca_file, base, config,
                       base / "dovecot.log", introspected, lmtp_port, lmtp_socket if lmtp else None)


def _wait_started(process: subprocess.Popen[bytes], peer: DovecotPeer) -> None:
    """Wait until Dovecot's master listens on both ports. Checked by trying to bind them, not
    by connecting: a probe connection would start an imap-login process that then waits for
    the auth service and holds up the stop by seconds."""
    deadline = time.monotonic() + _START_TIMEOUT
    ports = [port for port in (peer.imap_port, peer.imaps_port, peer.lmtp_port) if port]
    while not all(_taken(peer.host, port) for port in ports) or \
            (peer.lmtp_socket is not None and not peer.lmtp_socket.exists()):
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace") if process.stderr else ""
            peer_unavailable(f"dovecot exited ({process.returncode}): {error.strip()}\n"
                             f"{peer.log()[-2000:]}")
        if time.monotonic() > deadline:
            peer_unavailable(f"dovecot did not listen in {_START_TIMEOUT}s: {peer.log()[-2000:]}")
        time.sleep(0.05)


def _taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the master we started (what `doveadm stop` does); Dovecot then waits several
    seconds for login processes, so after a short grace SIGKILL its process group (the master
    leads its own session: the group is ours alone)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    if process.stderr is not None:
        process.stderr.close()


def _start_introspection(user: str, token: str, asked: list[str]) -> http.server.HTTPServer:
    """A loopback HTTP server answering Dovecot's token introspection (RFC 7662 style POST)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            asked_token = (form.get("token") or [""])[0]
            asked.append(asked_token)
            answer = {"active": True, "username": user} if asked_token == token else {"active": False}
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, name="oauth2-introspection", daemon=True).start()
    return server

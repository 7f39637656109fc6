"""A real Postfix instance on a loopback address, playing a downstream MX (the refusing "Gmail").

What it does: `running_postfix(workdir)` writes a private Postfix instance under `workdir`
(config, queue, data directory, log, Maildirs), runs its `master` daemon in the foreground,
waits until its SMTP port answers, yields a `PostfixPeer`, and stops it on exit.

The instance:
- listens only on `host:port` (a loopback address; Linux answers on all of 127.0.0.0/8);
- accepts mail for `domains` (virtual mailbox domains) and delivers it with virtual(8) into
  Maildirs under `root`, written as uid `nobody`. With `users=(...)` only those addresses exist,
  each with its own Maildir `root/<address>/` (lower case). With `users=None` every local part
  made of [A-Za-z0-9._+-] exists and shares one catch-all Maildir per domain, `root/@<domain>/`
  (virtual(8) forbids $1 in mailbox paths); `messages(address)` then picks the copies by the
  `Delivered-To:` header virtual(8) prepends. Stored messages have LF line ends and start with
  Return-Path, X-Original-To, Delivered-To and Postfix's Received header;
- refuses unknown users at RCPT with
  `550 5.1.1 <x@gmail.com>: Recipient address rejected: User unknown in virtual mailbox table`;
- refuses relaying to other domains (`554 5.7.1 ... Relay access denied`);
- rejects after DATA any message whose body (`body_reject`) or header (`header_reject`) matches a
  POSIX extended regular expression (Postfix `regexp:` table, case-insensitive). Postfix's
  REJECT action always answers with SMTP code 550; the enhanced code and text are ours. The
  default rule gives, exactly:
      `550 5.7.0 message refused: virus found`
  (a 552 is not possible with body_checks: Postfix ignores a leading reply code in the text and
  takes only an X.Y.Z enhanced code; without one it inserts 5.7.1);
- never delivers anywhere else: no relayhost, every non-virtual transport is `error:`, DNS is
  disabled (`smtp_dns_support_level = disabled`, `smtpd_peername_lookup = no`, explicit
  `myhostname`), IPv4 only, banner without version.

How it runs (as root, as the tests and CI do): nothing of the system's /etc/postfix is read or
changed (meta_directory points at the instance's conf directory). The queue tree is created
here with Postfix's owners and modes, then `<daemon_directory>/master -c WORKDIR/conf -s` runs
in the foreground as a child of the test; it makes itself session and process-group leader.
Stopping sends SIGTERM to that master PID (master passes it on to its children), waits for it,
then SIGKILLs by PID whatever of its process group is still alive after a short grace.
`postfix -c WORKDIR/conf status|stop` also work on a running instance, but `postfix -c DIR
start` does not: its integrity check (post-install) wants postfix-files in meta_directory.
Unprivileged Postfix processes must not need to traverse `workdir`'s parents, so that
`workdir` may sit in a private (0700) directory such as pytest's tmp_path: data_directory is
relative to the queue directory (the daemons' working directory), virtual_mailbox_base is
`/proc/self/cwd/mail` (virtual(8) insists on an absolute path; the magic link resolves to the
queue directory without a path walk), and virtual_mailbox_maps is an inline table (virtual(8)
opens its maps as mail_owner). Config files are back-dated: Postfix waits up to ~2 s before
reading a file modified within the current second.

Exposure: test-only; loopback only. Failure: start-up problems raise RuntimeError with the tail
of the instance's log (or skip/fail via `tests.peers.need` when Postfix is not installed).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.peers import need
from tests.peers.ports import free_port, wait_port

_DEFAULT_BODY_REJECT: tuple[tuple[str, str], ...] = (
    ("EICAR-STANDARD-ANTIVIRUS-TEST-FILE", "5.7.0 message refused: virus found"),
)
_START_TIMEOUT = 15.0  # seconds for master to bind its SMTP port
_STOP_TIMEOUT = 10.0  # seconds for master and its children to exit after SIGTERM
_STOP_GRACE = 0.5  # seconds children get to exit on their own after the master is gone
# Queue subdirectories and their modes, as Postfix's own postfix-files creates them.
_QUEUE_DIRS: tuple[tuple[str, int, bool], ...] = (  # (name, mode, group is setgid_group)
    ("active", 0o700, False), ("bounce", 0o700, False), ("corrupt", 0o700, False),
    ("defer", 0o700, False), ("deferred", 0o700, False), ("flush", 0o700, False),
    ("hold", 0o700, False), ("incoming", 0o700, False), ("private", 0o700, False),
    ("saved", 0o700, False), ("trace", 0o700, False),
    ("maildrop", 0o730, True), ("public", 0o710, True),
)
_SAFE_DOMAIN = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")
_SAFE_ADDRESS = re.compile(r"[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+")
_MAIL_SUBDIR = "mail"  # Maildirs, relative to the queue directory
_DATA_SUBDIR = "data"  # data_directory, relative to the queue directory


@dataclass(frozen=True, slots=True)
class PostfixPeer:
    """A running Postfix instance: where it listens and where it delivered."""

    host: str
    port: int
    root: Path  # one Maildir per recipient address: root/<address>/{new,cur,tmp}
    log_path: Path

    def messages(self, address: str) -> list[bytes]:
        """Raw bytes of every message delivered to `address`, oldest first."""
        address = address.lower()
        own = _maildir_files(self.root / address)
        shared = _maildir_files(self.root / _catch_all(address.rpartition("@")[2]))
        found = [(p, p.read_bytes()) for p in own]
        found += [(p, data) for p in shared if _delivered_to(data := p.read_bytes()) == address]
        found.sort(key=lambda item: (item[0].stat().st_mtime_ns, item[0].name))
        return [data for _, data in found]

    def wait_messages(self, address: str, count: int, timeout: float = 15.0) -> list[bytes]:
        """Wait until at least `count` messages reached `address`; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(address)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{address}: {len(found)} of {count} messages after {timeout}s; "
                    f"postfix log tail:\n{_tail(self.log())}"
                )
            time.sleep(0.05)

    def log(self) -> str:
        """The instance's mail log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextmanager
def running_postfix(
    workdir: Path,
    *,
    host: str = "127.0.0.2",
    port: int | None = None,
    domains: Sequence[str] = ("gmail.com",),
    body_reject: Sequence[tuple[str, str]] = _DEFAULT_BODY_REJECT,
    extra_main_cf: Mapping[str, str] | None = None,
    users: Sequence[str] | None = None,
    header_reject: Sequence[tuple[str, str]] = (),
    hostname: str = "mx.peer.test",
) -> Iterator[PostfixPeer]:
    """Run a private Postfix on host:port (a free port if None) until the block exits.

    `body_reject`/`header_reject`: (POSIX ERE, "5.X.Y text") pairs; a match refuses the message
    with "550 5.X.Y text". `users`: the only existing addresses (None: any local part exists).
    `extra_main_cf` overrides or adds main.cf parameters. `workdir` should be used by one
    instance only.
    """
    need("postfix", "postfix")
    postconf = need("postconf", "postfix")
    if not host.startswith("127."):
        raise ValueError(f"postfix peer must listen on loopback, not {host}")
    for domain in domains:
        if not _SAFE_DOMAIN.fullmatch(domain):
            raise ValueError(f"postfix peer domain must match {_SAFE_DOMAIN.pattern}: {domain!r}")
    port = free_port(host) if port is None else port
    workdir = Path(workdir).resolve()
    conf, queue, log_path = workdir / "conf", workdir / "queue", workdir / "maillog"
    root = queue / _MAIL_SUBDIR
    _make_queue(queue)
    conf.mkdir(parents=True, exist_ok=True)
    _write_table(conf / "body_checks", body_reject)
    _write_table(conf / "header_checks", header_reject)
    main_cf = _main_cf(workdir, conf, queue, log_path, domains, users, hostname, bool(header_reject))
    main_cf.update(extra_main_cf or {})
    (conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
    (conf / "master.cf").write_text(_master_cf(host, port))
    _backdate(conf)
    master = Path(_postconf_value(postconf, conf, "daemon_directory")) / "master"
    if not os.access(master, os.X_OK):
        raise RuntimeError(f"postfix master daemon not found at {master}")
    with open(workdir / "master.out", "ab") as out:
        proc = subprocess.Popen(
            [str(master), "-c", str(conf), "-s"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=queue,
        )
    peer = PostfixPeer(host=host, port=port, root=root, log_path=log_path)
    try:
        _wait_started(proc, peer)
        yield peer
    finally:
        _stop(proc)


def _make_queue(queue: Path) -> None:
    """Create the queue directory tree with the owners and modes Postfix insists on."""
    owner, nobody = pwd.getpwnam("postfix"), pwd.getpwnam("nobody")
    setgid_group = grp.getgrnam("postdrop").gr_gid
    queue.mkdir(parents=True, exist_ok=True)
    os.chmod(queue, 0o755)
    (queue / "pid").mkdir(exist_ok=True)
    layout = [(name, mode, owner.pw_uid, setgid_group if setgid else owner.pw_gid)
              for name, mode, setgid in _QUEUE_DIRS]
    layout.append((_DATA_SUBDIR, 0o700, owner.pw_uid, owner.pw_gid))
    layout.append((_MAIL_SUBDIR, 0o700, nobody.pw_uid, nobody.pw_gid))
    for name, mode, uid, gid in layout:
        path = queue / name
        path.mkdir(exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)


def _main_cf(
    workdir: Path, conf: Path, queue: Path, log_path: Path,
    domains: Sequence[str], users: Sequence[str] | None, hostname: str, with_header_checks: bool,
) -> dict[str, str]:
    nobody = pwd.getpwnam("nobody")
    refuse = "error:5.7.1 outbound delivery disabled in this test peer"
    params = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue),
        "data_directory": _DATA_SUBDIR,  # relative: daemons run inside queue_directory
        "meta_directory": str(conf),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "maillog_file": str(log_path),
        "maillog_file_prefixes": str(workdir),
        "myhostname": hostname,
        "mydomain": hostname.partition(".")[2] or hostname,
        "myorigin": "$myhostname",
        "smtpd_banner": "$myhostname ESMTP",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mydestination": "",
        "relay_domains": "",
        "relayhost": "",
        "fast_flush_domains": "",
        "mynetworks": "127.0.0.0/8",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "append_dot_mydomain": "no",
        "biff": "no",
        "default_transport": refuse,
        "relay_transport": refuse,
        "local_transport": refuse,
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "smtpd_relay_restrictions": "reject_unauth_destination",
        "smtpd_recipient_restrictions": "",
        "smtpd_reject_unlisted_recipient": "yes",
        "unknown_virtual_mailbox_reject_code": "550",
        "virtual_mailbox_domains": ", ".join(domains),
        "virtual_mailbox_maps": _mailbox_map(domains, users),
        "virtual_mailbox_base": f"/proc/self/cwd/{_MAIL_SUBDIR}",  # = queue/mail; see docstring
        "virtual_uid_maps": f"static:{nobody.pw_uid}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
        "virtual_minimum_uid": "1",
        "body_checks": f"regexp:{conf / 'body_checks'}",
        "header_checks": f"regexp:{conf / 'header_checks'}" if with_header_checks else "",
        "in_flow_delay": "0s",  # a test sink should not slow senders down
        "notify_classes": "",
        "smtputf8_enable": "yes",
    }
    return params


def _master_cf(host: str, port: int) -> str:
    services = (
        f"{host}:{port} inet n - n - - smtpd",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "anvil unix - - n - 1 anvil",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "virtual unix - n n - - virtual",
        "postlog unix-dgram n - n - 1 postlogd",
    )
    return "\n".join(services) + "\n"


def _ere_escape(text: str) -> str:
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\/" else c for c in text)


def _write_table(path: Path, rules: Sequence[tuple[str, str]]) -> None:
    """A regexp: table of `/pattern/ REJECT text` lines (pattern is a POSIX ERE)."""
    lines = []
    for pattern, text in rules:
        if "\n" in pattern or "\n" in text:
            raise ValueError("postfix check rules must be single lines")
        lines.append(f"/{pattern.replace('/', chr(92) + '/')}/ REJECT {text}\n")
    path.write_text("".join(lines))


def _mailbox_map(domains: Sequence[str], users: Sequence[str] | None) -> str:
    """Inline regexp table: address -> Maildir path under virtual_mailbox_base (trailing /).

    Inline, because virtual(8) opens its maps as the unprivileged mail_owner, who may not be
    able to reach a file under a private workdir. virtual(8) forbids $1 substitution in its
    results, so "any user" is one catch-all Maildir per domain, named "@domain".
    `$$` is main.cf's escape for a literal `$`.
    """
    if users is None:
        rules = [f"{{/@{_ere_escape(d)}$$/ {_catch_all(d)}/}}" for d in domains]
    else:
        for user in users:
            if not _SAFE_ADDRESS.fullmatch(user):
                raise ValueError(f"postfix peer user must match {_SAFE_ADDRESS.pattern}: {user!r}")
        rules = [f"{{/^{_ere_escape(u)}$$/ {u.lower()}/}}" for u in users]
    if not rules:
        return ""
    return "regexp:{ " + ", ".join(rules) + " }"


def _catch_all(domain: str) -> str:
    return "@" + domain.lower()


def _delivered_to(message: bytes) -> str:
    """The first Delivered-To header virtual(8) prepended, lower-cased ("" if none)."""
    for line in message.split(b"\n", 20)[:20]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"delivered-to":
            return value.strip().decode("ascii", "replace").lower()
    return ""


def _maildir_files(box: Path) -> list[Path]:
    return [p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir()]


def _backdate(conf: Path) -> None:
    """Make the config files look settled: Postfix re-reads a file modified within the current
    second (every 300 ms, up to ~2 s), waiting for a writer to finish."""
    settled = time.time() - 10
    for path in conf.iterdir():
        os.utime(path, (settled, settled))


def _postconf_value(postconf: str, conf: Path, name: str) -> str:
    result = subprocess.run(
        [postconf, "-c", str(conf), "-h", name],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return result.stdout.strip()


def _wait_started(proc: subprocess.Popen[bytes], peer: PostfixPeer) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"postfix master exited with {proc.returncode}; log tail:\n{_tail(peer.log())}"
            )
        try:
            wait_port(peer.host, peer.port, timeout=0.2)
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"postfix did not listen on {peer.host}:{peer.port}; log tail:\n{_tail(peer.log())}"
                ) from None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the master we started, wait for it, then make sure its process group is gone.

    Master passes SIGTERM on to its children; a child caught between fork and exec may sleep
    a second before it exits, so after a short grace period what is left of the group gets
    SIGKILL, by PID. Zombies (reaped later by init) count as gone.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    group = proc.pid  # master made itself leader of this process group
    deadline = time.monotonic() + _STOP_GRACE
    while (left := _live_group_members(group)) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _STOP_TIMEOUT
    while _live_group_members(group) and time.monotonic() < deadline:
        time.sleep(0.02)


def _live_group_members(group: int) -> list[int]:
    """PIDs of processes in process group `group` that are not zombies (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # state ppid pgrp ...
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


__all__ = ["PostfixPeer", "running_postfix"]

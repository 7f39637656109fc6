"""The seed's recipe on real Postfix: MTA1 (example.com, the mailboxes) and MTA2 (the fallback).

What it does: `PostfixRecipe(workdir, ports, gmail).start()` writes two private Postfix
instances under `workdir` and runs their `master -c DIR -s` daemons in the foreground:
- MTA1 on 127.0.0.1:<mta1>: `ituki@example.com` expands (virtual alias) to the PC mailbox and
  the gmail address; the gmail address goes through transport `fbsmtp` = smtp with
  `-o smtp_fallback_relay=[127.0.0.1]:<mta2> -o soft_bounce=yes` to the stand-in gmail; the
  PC and detour mailboxes (pc.example.net, gm.example.net) are Maildirs written by virtual(8).
- MTA2 on 127.0.0.1:<mta2>: accepts gmail.com, rewrites `ituki-ex@gmail.com` to
  `ituki@gm.example.net` (virtual alias) and relays everything to MTA1 (relayhost).
This is slide "実構成例" of the seed deck, minus DKIM signing (maildetour's seed config does not
sign either) unless `dkim` is set: then MTA1 signs as in the slide, with OpenDKIM as a milter
(`bench/opendkim.py`, a key made for the run) in `smtpd_milters` and `non_smtpd_milters`, so
every message MTA1 receives is signed once, before its copies fan out (and a detoured copy again
when MTA2 relays it back). Postfix defaults are kept except what loopback-only operation needs
(no DNS, no peer name lookups, explicit hostnames, everything else refused with `error:`) and
`max_idle`.

How it runs as root without touching /etc/postfix: meta_directory is the instance's own conf
directory, the queue tree is made here with Postfix's owners and modes, and the Maildirs live
inside the queue directory (virtual(8) runs as `nobody` and reaches them via /proc/self/cwd).
The stand-in gmail must sit on another loopback address than MTA2: the smtp client skips
fallback addresses it already used from its connection cache *by IP address*, so with both on
127.0.0.1 every copy refused over a reused (cached) connection is deferred, not detoured.
Stop: SIGTERM to each master PID we started, then SIGKILL by PID to what is left of its process
group; then the milter. Exposure: bench-only, loopback. Failure: RuntimeError with the log tail.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.opendkim import OpenDkim
from bench.proc import cpu_seconds_tree, die_with_parent, group_members, terminate, wait_port

PUBLIC = "ituki@example.com"
PC = "ituki@pc.example.net"
GMAIL = "ituki-ex@gmail.com"
DETOUR = "ituki@gm.example.net"
DKIM_DOMAIN = "example.com"  # d= of MTA1's signature in the DKIM variant (maildetour's too)
DKIM_SELECTOR = "pf1"

_QUEUE_DIRS = ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
               "private", "saved", "trace")
_REFUSE = "error:5.7.1 not routed in the bench"


@dataclass
class Instance:
    name: str
    workdir: Path
    port: int
    main_cf: dict[str, str]
    extra_services: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.workdir / "conf"

    @property
    def queue(self) -> Path:
        return self.workdir / "queue"

    @property
    def log_path(self) -> Path:
        return self.workdir / "maillog"

    def write(self) -> None:
        _make_queue(self.queue)
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main_cf.items()))
        (self.conf / "master.cf").write_text(_master_cf(self.port, self.extra_services))
        settled = time.time() - 10  # Postfix waits ~2 s for files changed in the current second
        for path in self.conf.iterdir():
            os.utime(path, (settled, settled))

    def start(self, daemon_dir: Path) -> None:
        with open(self.workdir / "master.out", "ab") as out:
            self.proc = subprocess.Popen([str(daemon_dir / "master"), "-c", str(self.conf), "-s"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.queue,
                                         preexec_fn=die_with_parent)
        try:
            wait_port("127.0.0.1", self.port, timeout=15, alive=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"postfix {self.name} did not start ({exc}):\n{self.log_tail()}") from None

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        terminate(proc)
        deadline = time.monotonic() + 1.0
        while (left := group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class PostfixRecipe:
    """Both MTAs of the seed's recipe, delivering the gmail copy to the stand-in at `gmail`."""

    workdir: Path
    mta1_port: int
    mta2_port: int
    gmail: tuple[str, int]  # the stand-in gmail; not on MTA2's address (see the docstring)
    max_idle: str = "100s"  # Postfix's default
    dkim: bool = False  # MTA1 signs with OpenDKIM (the DKIM variant)
    instances: list[Instance] = field(default_factory=list)
    signer: OpenDkim | None = field(default=None, init=False)

    name = "postfix"

    @property
    def smtp_port(self) -> int:
        return self.mta1_port

    def maildir(self, address: str) -> Path:
        return self.workdir / "mta1" / "queue" / "mail" / address

    def start(self) -> None:
        daemon_dir = Path(_postconf("daemon_directory"))
        if self.dkim:
            self.signer = OpenDkim(self.workdir / "opendkim", DKIM_DOMAIN, DKIM_SELECTOR)
        mta1 = Instance("mta1", self.workdir / "mta1", self.mta1_port, self._mta1_cf(),
                        (f"fbsmtp unix - - n - - smtp -o smtp_fallback_relay=[127.0.0.1]:{self.mta2_port}"
                         " -o soft_bounce=yes",))
        mta2 = Instance("mta2", self.workdir / "mta2", self.mta2_port, self._mta2_cf())
        for inst in (mta1, mta2):
            inst.write()
        nobody = pwd.getpwnam("nobody")
        for address in (PC, DETOUR):  # made now so that a watcher can watch new/ from the start
            for sub in ("tmp", "new", "cur"):
                path = self.maildir(address) / sub
                path.mkdir(parents=True, exist_ok=True)
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            os.chown(self.maildir(address), nobody.pw_uid, nobody.pw_gid)
        try:
            if self.signer is not None:  # first: smtpd defers mail while its milter is down
                self.signer.start()
            for inst in (mta2, mta1):
                self.instances.append(inst)
                inst.start(daemon_dir)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for inst in reversed(self.instances):
            inst.stop()
        self.instances.clear()
        if self.signer is not None:
            self.signer.stop()

    @property
    def dkim_key(self) -> Path | None:
        """The private key MTA1 signs with (the DKIM variant), for checking its signatures."""
        return self.signer.key_file if self.signer else None

    def cpu_seconds(self) -> float:
        """CPU time of both masters and all their children, finished ones included, and of the
        signing milter (the DKIM variant): all of it is the recipe's work."""
        found = sum(cpu_seconds_tree(inst.proc.pid) for inst in self.instances if inst.proc)
        return found + (self.signer.cpu_seconds() if self.signer else 0.0)

    def logs(self) -> str:
        return "\n".join(f"--- {inst.name}\n{inst.log_tail()}" for inst in self.instances)

    def _common(self, name: str) -> dict[str, str]:
        base = self.workdir / name
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(base / "queue"),
            "data_directory": "data",  # relative: daemons run inside queue_directory
            "meta_directory": str(base / "conf"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(base / "maillog"),
            "maillog_file_prefixes": str(self.workdir),
            "myhostname": f"{name}.example.com",
            "mydomain": "example.com",
            "myorigin": "$myhostname",
            "smtpd_banner": "$myhostname ESMTP",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "append_dot_mydomain": "no",
            "biff": "no",
            "local_transport": _REFUSE,
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "notify_classes": "",
            "max_idle": self.max_idle,
        }

    def _mta1_cf(self) -> dict[str, str]:
        nobody = pwd.getpwnam("nobody")
        params = self._common("mta1")
        params.update({
            "default_transport": _REFUSE,  # bounces to senders go nowhere: loopback only
            "relay_transport": _REFUSE,
            "relayhost": "",
            "virtual_alias_domains": "example.com",
            "virtual_alias_maps": f"inline:{{ {{ {PUBLIC} = {PC}, {GMAIL} }} }}",
            "transport_maps": f"inline:{{ {GMAIL}=fbsmtp:[{self.gmail[0]}]:{self.gmail[1]} }}",
            "virtual_mailbox_domains": "pc.example.net, gm.example.net",
            "virtual_mailbox_maps": f"inline:{{ {PC}={PC}/, {DETOUR}={DETOUR}/ }}",
            "virtual_mailbox_base": "/proc/self/cwd/mail",  # = queue/mail, see the docstring
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "virtual_minimum_uid": "1",
        })
        if self.signer is not None:
            params.update({"smtpd_milters": self.signer.milter, "non_smtpd_milters": self.signer.milter})
        return params

    def _mta2_cf(self) -> dict[str, str]:
        params = self._common("mta2")
        params.update({
            "virtual_alias_domains": "gmail.com",
            "virtual_alias_maps": f"inline:{{ {GMAIL}={DETOUR} }}",
            "relayhost": f"[127.0.0.1]:{self.mta1_port}",
        })
        return params


def _master_cf(port: int, extra: tuple[str, ...]) -> str:
    services = (
        f"127.0.0.1:{port} inet n - n - - smtpd",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
        "smtp unix - - n - - smtp",
        "relay unix - - n - - smtp",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "virtual unix - n n - - virtual",
        "postlog unix-dgram n - n - 1 postlogd",
    ) + extra
    return "\n".join(services) + "\n"


def _make_queue(queue: Path) -> None:
    """The queue tree with the owners and modes Postfix insists on (as postfix-files makes it)."""
    owner = pwd.getpwnam("postfix")
    postdrop = grp.getgrnam("postdrop").gr_gid
    nobody = pwd.getpwnam("nobody")
    queue.mkdir(parents=True, exist_ok=True)
    os.chmod(queue, 0o755)
    (queue / "pid").mkdir(exist_ok=True)
    layout = [(name, 0o700, owner.pw_uid, owner.pw_gid) for name in _QUEUE_DIRS]
    layout += [("maildrop", 0o730, owner.pw_uid, postdrop), ("public", 0o710, owner.pw_uid, postdrop),
               ("data", 0o700, owner.pw_uid, owner.pw_gid), ("mail", 0o700, nobody.pw_uid, nobody.pw_gid)]
    for name, mode, uid, gid in layout:
        path = queue / name
        path.mkdir(exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)


def _postconf(name: str) -> str:
    result = subprocess.run(["postconf", "-d", "-h", name], capture_output=True, text=True, check=True,
                            timeout=30)
    return result.stdout.strip()

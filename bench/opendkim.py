"""OpenDKIM as the seed's MTA1 signer: the milter the Postfix recipe's DKIM variant signs with.

What it does: `OpenDkim(workdir, domain, selector).start()` makes a 2048-bit RSA key for the
run (`opendkim-genkey`, the same size `maildetour dkim keygen` makes), writes its own
`opendkim.conf`, KeyTable and SigningTable under `workdir`, and runs `opendkim -f` in the
foreground on a free loopback TCP port (`milter` is the value for Postfix's
`smtpd_milters`/`non_smtpd_milters`). Configuration: Debian's shipped `/etc/opendkim.conf`
(relaxed/simple, From oversigned) except what the bench needs: sign only (`Mode s`: verifying
would look keys up in DNS, and the bench asks no resolver), no syslog, a SigningTable `*` -> our
key, so every message MTA1 receives from a trusted client (127.0.0.1, OpenDKIM's default
InternalHosts) is signed `d=<domain>` whatever its From — as a forwarder signs what it relays —
and `RequireSafeKeys no`: that check refuses a key below any group- or world-writable directory
(such as /tmp, where `--out` may point; every message is then answered 451), while the key
itself is made here, owned by root, mode 0600. `key_file` is the private key (for the check at
the stand-in).

Contract: loopback only; stops its child by PID (SIGTERM, then SIGKILL). Exposure: bench-only.
Failure: RuntimeError with opendkim's output when it does not listen within 15 s;
FileNotFoundError when opendkim or opendkim-genkey is missing (Debian: opendkim,
opendkim-tools).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.proc import cpu_seconds_tree, die_with_parent, free_port, terminate, wait_port

_CONFIG = """\
Syslog                  no
Mode                    s
Canonicalization        relaxed/simple
OversignHeaders         From
RequireSafeKeys         no
UMask                   007
Socket                  inet:{port}@127.0.0.1
PidFile                 {base}/opendkim.pid
KeyTable                {base}/key.table
SigningTable            refile:{base}/signing.table
"""


def program(name: str) -> str:
    """The path of an OpenDKIM program (`opendkim`, `opendkim-genkey`)."""
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if found is None:
        raise FileNotFoundError(f"{name} not found (Debian packages opendkim and opendkim-tools)")
    return found


class OpenDkim:
    def __init__(self, workdir: Path, domain: str, selector: str) -> None:
        self.base, self.domain, self.selector = workdir, domain, selector
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @property
    def key_file(self) -> Path:
        return self.base / f"{self.selector}.private"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        subprocess.run([program("opendkim-genkey"), "--bits=2048", f"--domain={self.domain}",
                        f"--selector={self.selector}", f"--directory={self.base}"],
                       check=True, capture_output=True, timeout=60)
        self.key_file.chmod(0o600)  # OpenDKIM refuses keys others can read (RequireSafeKeys)
        key_name = f"{self.selector}._domainkey.{self.domain}"
        (self.base / "key.table").write_text(f"{key_name} {self.domain}:{self.selector}:{self.key_file}\n")
        (self.base / "signing.table").write_text(f"* {key_name}\n")
        conf = self.base / "opendkim.conf"
        conf.write_text(_CONFIG.format(port=self.port, base=self.base))
        with open(self.base / "opendkim.out", "ab") as out:
            self.proc = subprocess.Popen([program("opendkim"), "-f", "-x", str(conf)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         preexec_fn=die_with_parent)
        try:
            wait_port("127.0.0.1", self.port, timeout=15, alive=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"opendkim did not start ({exc}):\n{self.output()}") from None

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None

    def cpu_seconds(self) -> float:
        """CPU time of the milter (all its threads)."""
        return cpu_seconds_tree(self.proc.pid) if self.proc else 0.0

    def output(self, lines: int = 20) -> str:
        try:
            text = (self.base / "opendkim.out").read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])

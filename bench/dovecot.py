"""Dovecot as "Gmail's IMAP side" for the bench: where maildetour's IMAP detour step appends.

What it does: `DovecotImap(workdir).start()` makes a self-signed certificate for 127.0.0.1
(openssl), writes a minimal Dovecot config (implicit TLS only, on a free loopback port; one
passwd-file user; Maildir under a directory of its own, owned by `nobody` since Dovecot will not
deliver as root), and runs `dovecot -F`. `maildir` is the user's Maildir: APPENDed messages are
linked into its new/, where the bench watches them arrive (visible to an IMAP client then).
`imap_table()` is the `[imap."bench"]` config table for maildetour.

Contract: loopback only; stops its child by PID (SIGTERM, then SIGKILL of its process group);
removes its directory. Exposure: bench-only. Failure: RuntimeError with Dovecot's log tail when
it does not listen within 15 s; FileNotFoundError when dovecot or openssl is missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from bench.proc import die_with_parent, free_port, wait_port

USER = "ituki-ex@gmail.com"
PASSWORD = "bench-app-password"

_CONFIG = """\
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
ssl = required
ssl_cert = <{base}/cert.pem
ssl_key = <{base}/key.pem
auth_mechanisms = plain login
mail_location = maildir:{base}/mail/%Lu
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%Lu
}}
service auth {{
  user = root
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
"""


class DovecotImap:
    def __init__(self) -> None:
        # Not under the bench's results directory: the mail user must be able to reach it.
        self.base = Path(tempfile.mkdtemp(prefix="maildetour-bench-dovecot-"))
        self.base.chmod(0o755)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.base / "cert.pem"

    @property
    def maildir(self) -> Path:
        return self.base / "mail" / USER

    def imap_table(self) -> str:
        (self.base / "app-password").write_text(PASSWORD + "\n")
        return (f'\n[imap."bench"]\nhost = "127.0.0.1"\nport = {self.port}\nuser = "{USER}"\n'
                f'password_file = "{self.base / "app-password"}"\nca_file = "{self.ca_file}"\n')

    def start(self) -> None:
        program = shutil.which("dovecot") or "/usr/sbin/dovecot"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(self.base / "key.pem"), "-out", str(self.ca_file)],
                       check=True, capture_output=True, timeout=60)
        mail_user = pwd.getpwnam("nobody")
        (self.base / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        for sub in ("tmp", "new", "cur"):  # made now so that a watcher can watch new/ at once
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        for path in [self.base / "mail", self.maildir, *(self.maildir / s for s in ("tmp", "new", "cur"))]:
            os.chown(path, mail_user.pw_uid, mail_user.pw_gid)
        config = self.base / "dovecot.conf"
        config.write_text(_CONFIG.format(base=self.base, uid=mail_user.pw_uid, gid=mail_user.pw_gid,
                                         port=self.port))
        self.proc = subprocess.Popen([program, "-F", "-c", str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        try:
            wait_port("127.0.0.1", self.port, timeout=15, alive=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"dovecot did not start ({exc})") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # login and imap processes linger
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None
        shutil.rmtree(self.base, ignore_errors=True)

"""A private PostgreSQL server on loopback, from Debian's package: the shared store of several nodes.

What it does: `running_postgres()` makes a new cluster in a fresh temporary directory with
Debian's `initdb` (/usr/lib/postgresql/<version>/bin, the newest installed), starts it with
`pg_ctl` listening on 127.0.0.1 on a free port only (its unix socket in the same directory, no
system socket touched), creates the database `maildetour`, yields a `PostgresPeer` and stops
it on exit. Nothing of the system's clusters (/etc/postgresql, /var/lib/postgresql, port 5432)
is read or used. The peer can be stopped, started and restarted in place (`stop`, `start`,
`restart`: the fault tests' database outage) and gives fresh databases (`new_database`) so
tests of one module can share one server.

How it runs: initdb refuses to run as root, so as root (the tests and CI) the cluster belongs
to the `postgres` system user Debian's package creates (`runuser -u postgres`); as anyone else
it is the caller's own. Authentication is `trust` on loopback only (a test database, nobody
else's). fsync stays on by default (the durability promise is measured as it is in production);
`fsync=False` trades it for speed where a test does not need it.

Exposure: test-only; loopback only. Failure: a missing package (or psycopg, `need_driver`) skips by hand and fails under
CI=true (`need`-like: `postgresql` must be in scripts/test PEERS); a server that does not start
raises RuntimeError with the tail of its log. Stopping: `pg_ctl stop -m fast`, then SIGKILL to
the postmaster's pid (from its pid file) if it lingers.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import in_ci
from tests.peers.ports import free_port

HOST = "127.0.0.1"
USER = "maildetour"  # the cluster's superuser (initdb -U)
_START_TIMEOUT = 30.0  # seconds for pg_ctl to see the server accept connections
_STOP_TIMEOUT = 20.0


def find_bin(program: str) -> Path:
    """`program` from the newest PostgreSQL installed by Debian's package; skip (by hand) or
    fail (CI) when there is none."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1]
    import pytest

    reason = f"peer program {program!r} not found (Debian package postgresql)"
    if in_ci():
        pytest.fail(reason + "; .ci/run should have installed it")
    pytest.skip(reason)
    raise AssertionError("unreachable")


@dataclass
class PostgresPeer:
    base: Path  # the temporary directory: data/, the socket, the log
    port: int
    owner: str | None  # the system user the cluster runs as (None: ourselves)
    log_path: Path = field(init=False)
    _databases: int = 0

    def __post_init__(self) -> None:
        self.log_path = self.base / "postgres.log"

    @property
    def data(self) -> Path:
        return self.base / "data"

    def url(self, database: str = "maildetour") -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(a) for a in args]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60, cwd=self.base)

    def start(self) -> None:
        done = self._run(str(find_bin("pg_ctl")), "-D", str(self.data), "-l", str(self.log_path), "-w",
                         "-t", str(int(_START_TIMEOUT)), "start", check=False)
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {done.stdout}{done.stderr}\n{self.log()[-3000:]}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate`: like a crash; the next start recovers from the WAL)."""
        pid = self.pid()
        if pid is None:
            return
        self._run(str(find_bin("pg_ctl")), "-D", str(self.data), "-m", mode, "-w", "-t", str(int(_STOP_TIMEOUT)),
                  "stop", check=False)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    def restart(self, down_for: float = 0.0, mode: str = "fast") -> None:
        self.stop(mode)
        time.sleep(down_for)
        self.start()

    def pid(self) -> int | None:
        """The postmaster's pid from its pid file, if it runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def psql(self, sql: str, database: str = "maildetour") -> str:
        """Run SQL with Debian's psql (tuples only, unaligned); the output."""
        done = subprocess.run(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", self.url(database), "-c", sql],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout.strip()

    def new_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        self._databases += 1
        name = f"{prefix}{os.getpid()}_{self._databases}"
        self.psql(f"CREATE DATABASE {name}", "postgres")
        return self.url(name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def need_driver() -> None:
    """psycopg 3 and its pool (the extra `maildetour[postgresql]`): skip by hand, fail in CI."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        import pytest

        reason = f"the PostgreSQL driver is not installed ({exc.name}: pip install 'maildetour[postgresql]')"
        if in_ci():
            pytest.fail(reason + "; scripts/test installs it")
        pytest.skip(reason)


@contextmanager
def running_postgres(*, fsync: bool = True, settings: dict[str, str] | None = None) -> Iterator[PostgresPeer]:
    """A new cluster on a free loopback port with the database `maildetour`, stopped and removed
    on exit. `settings` go into postgresql.conf (name -> value as written there)."""
    need_driver()
    initdb = find_bin("initdb")
    if shutil.which("psql") is None:
        find_bin("psql")  # (skips or fails with the package's name)
    owner: str | None = None
    if os.geteuid() == 0:
        owner = "postgres"
        try:
            pwd.getpwnam(owner)
        except KeyError:
            raise RuntimeError("the postgres system user is missing (Debian's postgresql package makes it)") from None
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="maildetour-pg-"))
    peer = PostgresPeer(base, free_port(HOST), owner)
    try:
        if owner is not None:
            entry = pwd.getpwnam(owner)
            os.chown(base, entry.pw_uid, entry.pw_gid)
        peer._run(str(initdb), "-D", str(peer.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8",
                  "--no-sync")
        conf = {
            "listen_addresses": f"'{HOST}'", "port": str(peer.port), "unix_socket_directories": f"'{base}'",
            "fsync": "on" if fsync else "off", "max_connections": "100", "logging_collector": "off",
            "log_min_messages": "warning", "log_connections": "off",
        } | (settings or {})
        with open(peer.data / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n# maildetour test peer\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))
        peer.start()
        peer.psql(f"CREATE DATABASE {USER}", "postgres")
        yield peer
    finally:
        peer.stop()
        shutil.rmtree(base, ignore_errors=True)

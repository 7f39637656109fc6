"""The server's listening sockets, made to match the config: at start and on each reload.

Internal. `Listeners.change(config, wiring)` binds what the new config adds (SMTP, POP3 plain
and implicit TLS) and returns a `Change`; `commit` then closes what it no longer names, while
`roll_back` closes what was just bound, so a reload that cannot bind leaves the running ones as
they were. Sessions of a closed listener go on to their end. A bind failure is a ConfigError
naming `smtp.listen` or `pop3.listen`/`pop3.listen_tls` and the address.
With SMTP intake workers (`[server] workers` > 1) the main process binds the SMTP sockets but
does not serve them (`serve_smtp=False`: a `HeldSockets` each); the workers it starts inherit
them and accept from the one queue the kernel keeps per socket (`smtp_sockets`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from maildetour.config import ConfigError
from maildetour.config.model import Config
from maildetour.core.hostport import HostPort
from maildetour.inbound.server import SessionFactory, start_smtp
from maildetour.metrics import Metrics
from maildetour.pop3.server import Pop3Server, start_pop3
from maildetour.wiring import Wiring

T = TypeVar("T")
_Pop3Key = tuple[str, int, bool]  # host, port, implicit TLS


def _pop3_wanted(config: Config) -> dict[_Pop3Key, HostPort]:
    wanted = {(hp.host, hp.port, False): hp for hp in config.pop3.listen}
    wanted.update({(hp.host, hp.port, True): hp for hp in config.pop3.listen_tls})
    return wanted


# Pending connections per listening socket before the kernel refuses more (asyncio's default).
_BACKLOG = 100


class SmtpListener(Protocol):
    def close(self) -> None: ...

    def is_serving(self) -> bool: ...


class HeldSockets:
    """An SMTP address bound and listening in the main process, served by the intake workers."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def is_serving(self) -> bool:
        return all(sock.fileno() >= 0 for sock in self.sockets)


async def hold_smtp(host: str, port: int) -> HeldSockets:
    """Bind `host:port` (each address it resolves to) as `loop.create_server` would, without
    serving it. Raises OSError."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                        flags=socket.AI_PASSIVE)
    made: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return HeldSockets(made)


@dataclass
class Change:
    """What one reload bound, and what it will close once it is committed."""

    smtp_added: dict[HostPort, SmtpListener] = field(default_factory=dict)
    smtp_removed: list[HostPort] = field(default_factory=list)
    pop3_added: list[_Pop3Key] = field(default_factory=list)
    pop3_removed: list[_Pop3Key] = field(default_factory=list)
    pop3_started: Pop3Server | None = None  # the POP3 service, when this change is its first listener


class Listeners:
    def __init__(self, sessions: SessionFactory, metrics: Metrics | None = None, *, serve_smtp: bool = True) -> None:
        self.sessions, self.metrics, self.serve_smtp = sessions, metrics, serve_smtp
        self.smtp: dict[HostPort, SmtpListener] = {}
        self.pop3: Pop3Server | None = None

    def smtp_sockets(self) -> list[socket.socket]:
        """The held SMTP sockets, for the intake workers (with `serve_smtp=False`)."""
        return [sock for held in self.smtp.values() if isinstance(held, HeldSockets) for sock in held.sockets]

    async def change(self, config: Config, wiring: Wiring) -> Change:
        """Bind every listener `config` names that is not bound yet. Raises ConfigError (with
        nothing left bound by this call)."""
        made = Change()
        try:
            for hp in config.smtp.listen:
                if hp not in self.smtp:
                    starting = start_smtp(self.sessions, hp.host, hp.port) if self.serve_smtp \
                        else hold_smtp(hp.host, hp.port)
                    made.smtp_added[hp] = await _bind("smtp.listen", hp, starting)
            made.smtp_removed = [hp for hp in self.smtp if hp not in config.smtp.listen]
            wanted = _pop3_wanted(config)
            pop3 = self.pop3
            if pop3 is None and wanted:
                pop3 = made.pop3_started = await start_pop3(
                    listen=[], listen_tls=[], accounts=wiring.pop3_accounts, ssl_context=wiring.pop3_tls,
                    settings=config.pop3.settings, hostname=config.server.hostname)
                pop3.count_logins(self.metrics)
            if pop3 is not None:
                for key, hp in wanted.items():
                    if key not in pop3.listening:
                        table_key = "pop3.listen_tls" if key[2] else "pop3.listen"
                        await _bind(table_key, hp, pop3.listen(hp.host, hp.port, tls=key[2], context=wiring.pop3_tls))
                        made.pop3_added.append(key)
                made.pop3_removed = [key for key in pop3.listening if key not in wanted]
        except BaseException:
            await self.roll_back(made)
            raise
        return made

    def commit(self, made: Change) -> None:
        """Keep what `made` bound; close what the new config no longer names."""
        self.smtp.update(made.smtp_added)
        for hp in made.smtp_removed:
            self.smtp.pop(hp).close()
        if made.pop3_started is not None:
            self.pop3 = made.pop3_started
        if self.pop3 is not None:
            for host, port, tls in made.pop3_removed:
                self.pop3.stop_listening(host, port, tls=tls)

    async def roll_back(self, made: Change) -> None:
        for server in made.smtp_added.values():
            server.close()
        if made.pop3_started is not None:
            made.pop3_started.close()
            await made.pop3_started.wait_closed()
        elif self.pop3 is not None:
            for host, port, tls in made.pop3_added:
                self.pop3.stop_listening(host, port, tls=tls)

    def describe(self) -> str:
        text = "smtp " + (", ".join(map(str, self.smtp)) or "none")
        if self.pop3 is not None and self.pop3.listening:
            text += "; pop3 " + ", ".join(f"{host}:{port}" + (" (tls)" if tls else "")
                                         for host, port, tls in sorted(self.pop3.listening))
        return text

    async def close(self) -> None:
        """Stop listening; POP3 sessions are dropped (deleting nothing), SMTP ones finish."""
        for server in self.smtp.values():
            server.close()
        if self.pop3 is not None:
            self.pop3.close()
            await self.pop3.wait_closed()


async def _bind(key: str, where: HostPort, starting: Awaitable[T]) -> T:
    """Await a listener's start; a bind failure becomes a ConfigError naming the key."""
    try:
        return await starting
    except OSError as exc:
        raise ConfigError(key, f"cannot listen on {where}: {exc.strerror or exc}") from None

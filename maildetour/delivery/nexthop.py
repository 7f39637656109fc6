"""Where to connect for a recipient domain: relay override, else MX (RFC 5321 5.1).

Internal; it queries DNS only through the resolver it is given (app.py builds it, pointed at
the configured servers; there is no default resolver here). For caching, give that resolver a
`dns.resolver.Cache` / `LRUCache`: dnspython then honours each record's TTL.

Contract: `NextHopResolver.resolve(domain)` never raises for DNS trouble; it returns
  `NextHops(hosts)`  addresses to try in order (IP literals: nothing left to resolve),
  `NoHost(reason)`   the domain has no mail host for good: NXDOMAIN, null MX (RFC 7505),
                     no MX and no A/AAAA, MX hosts without addresses,
  `DnsTemporary(reason)` timeout, SERVFAIL, no resolver: try again later.
Order: a `relay` entry (Postfix transport_maps: a host name or IP literal, A/AAAA only, no MX)
wins over MX. MX records are sorted by preference, shuffled among equal preference; each
exchange yields its A addresses, then its AAAA addresses. No MX at all -> the domain's own A/AAAA
("implicit MX"). DNS exceptions are mapped to values in one place: `_dns_failure`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import dns.asyncresolver
import dns.exception
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from maildetour.core.hostport import HostPort

# RFC 5321 does not bound MX records; Postfix tries 5 addresses (smtp_mx_address_limit).
# We keep the first exchanges by preference, so a hostile zone cannot make us resolve hundreds.
MAX_EXCHANGES = 5
MAX_ADDRESSES = 10


@dataclass(frozen=True, slots=True)
class NextHops:
    hosts: tuple[HostPort, ...]  # never empty
    relay: bool = False  # a configured relay, not the domain's MX (MTA-STS does not apply)


@dataclass(frozen=True, slots=True)
class NoHost:
    reason: str


@dataclass(frozen=True, slots=True)
class DnsTemporary:
    reason: str


Resolution = NextHops | NoHost | DnsTemporary


@dataclass(frozen=True, slots=True)
class _Addresses:
    """Addresses of one name: `temporary` is set when a lookup failed for now."""

    ips: tuple[str, ...]
    temporary: str | None = None


def _ip_literal(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return None


def _dns_failure(exc: BaseException, what: str) -> NoHost | DnsTemporary:
    """The one mapping of DNS exceptions to values. Unknown means temporary."""
    match exc:
        case dns.resolver.NXDOMAIN():
            return NoHost(f"{what}: no such domain")
        case dns.resolver.YXDOMAIN():
            return NoHost(f"{what}: name too long")
        case dns.exception.Timeout():
            return DnsTemporary(f"{what}: DNS timeout")
        case dns.resolver.NoNameservers():
            return DnsTemporary(f"{what}: DNS server failure")
        case _:
            return DnsTemporary(f"{what}: DNS error ({type(exc).__name__})")


class NextHopResolver:
    """Resolves a recipient domain to the addresses to connect to, in order."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver | None,
        *,
        relay: Mapping[str, HostPort] | None = None,
        port: int,
        rng: random.Random | None = None,
    ) -> None:
        """`resolver` None: only relay entries work; other domains are `DnsTemporary`.
        `port` is used for MX and implicit-MX hosts (`delivery.smtp_port`, 25 in production)."""
        self._resolver = resolver
        self._relay = {d.lower().rstrip("."): hp for d, hp in (relay or {}).items()}
        self._port = port
        self._rng = rng or random.Random()

    async def resolve(self, domain: str) -> Resolution:
        domain = domain.lower().rstrip(".")
        relay = self._relay.get(domain)
        if relay is not None:
            return await self._resolve_relay(domain, relay.host, relay.port)
        if self._resolver is None:
            return DnsTemporary(f"{domain}: no relay and no DNS resolver configured")
        try:
            answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except Exception as exc:  # DNS trouble is a value, mapped in one place
            return _dns_failure(exc, f"MX {domain}")
        records = list(answer.rrset) if answer.rrset is not None else []
        if not records:
            return await self._implicit_mx(domain)
        named = [r for r in records if r.exchange.to_text() != "."]
        if not named:
            return NoHost(f"{domain}: null MX, the domain accepts no mail (RFC 7505)")
        return await self._exchanges(domain, self._order(named))

    def _order(self, records: Sequence[MX]) -> list[str]:
        """Exchange names by preference; random order among equal preference; no repeats."""
        keyed = sorted(
            (r.preference, self._rng.random(), r.exchange.to_text(omit_final_dot=True))
            for r in records
        )
        names: list[str] = []
        for _, _, name in keyed:
            if name.lower() not in {n.lower() for n in names}:
                names.append(name)
        return names[:MAX_EXCHANGES]

    async def _resolve_relay(self, domain: str, host: str, port: int) -> Resolution:
        literal = _ip_literal(host)
        if literal is not None:
            return NextHops((HostPort(literal, port, literal),), relay=True)
        if self._resolver is None:
            return DnsTemporary(f"relay {host} for {domain}: no DNS resolver configured")
        found = await self._addresses(host)
        return self._hops([(host, found)], port, f"relay {host} for {domain}", relay=True)

    async def _implicit_mx(self, domain: str) -> Resolution:
        found = await self._addresses(domain)
        if not found.ips and found.temporary is None:
            return NoHost(f"{domain}: no MX and no A/AAAA record")
        return self._hops([(domain, found)], self._port, domain)

    async def _exchanges(self, domain: str, names: list[str]) -> Resolution:
        results = await asyncio.gather(*(self._addresses(name) for name in names))
        return self._hops(list(zip(names, results)), self._port, f"MX hosts of {domain}")

    def _hops(self, found: list[tuple[str, _Addresses]], port: int, what: str, relay: bool = False) -> Resolution:
        hosts = tuple(HostPort(ip, port, name) for name, addrs in found for ip in addrs.ips)
        if hosts:
            return NextHops(hosts[:MAX_ADDRESSES], relay)
        temporary = [addrs.temporary for _, addrs in found if addrs.temporary]
        if temporary:
            return DnsTemporary(f"{what}: " + "; ".join(temporary))
        return NoHost(f"{what}: no address (A/AAAA) found")

    async def _addresses(self, name: str) -> _Addresses:
        """A addresses, then AAAA addresses, of `name`."""
        literal = _ip_literal(name)
        if literal is not None:
            return _Addresses((literal,))
        assert self._resolver is not None
        ips: list[str] = []
        temporary: str | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
            except Exception as exc:  # DNS trouble is a value, mapped in one place
                match _dns_failure(exc, f"{rdtype} {name}"):
                    case NoHost():
                        break  # the name does not exist: no AAAA either
                    case DnsTemporary(reason):
                        temporary = reason
                continue
            if answer.rrset is not None:
                ips.extend(str(ipaddress.ip_address(r.address)) for r in answer.rrset)
        return _Addresses(tuple(ips), temporary)

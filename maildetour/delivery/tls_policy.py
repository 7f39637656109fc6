"""Which TLS the next hop of a copy must give: the config first, then the domain's MTA-STS.

What it does: `TlsPolicies.policy(domain, address)` says how a copy to `address` at `domain`
must travel: `none` (plain text), `opportunistic` (STARTTLS when offered, unverified, plain
text if it fails), `required` (STARTTLS must work; the certificate is not checked) or `verify`
(STARTTLS must work and the certificate must be valid for the MX host name). The mode is the
destination's own `tls`, else the domain's entry in `[delivery] tls_policy`, else
`[delivery] tls`. A domain that publishes an MTA-STS policy in `enforce` mode (RFC 8461) can
only make that stronger: `verify`, and only MX hosts its policy names. `MtaSts` finds and
caches such policies: the `_mta-sts.<domain>` TXT record through our resolver, then the
policy file over HTTPS from `mta-sts.<domain>` (certificate verified, no redirects, at most
64 KB), cached for its max_age and fetched again when the TXT id changes.
Contract: never raises for DNS or network trouble: a policy that cannot be had now is the one
cached before (still valid), else none (RFC 8461 5.1: deliver as without MTA-STS). The cache
lives in memory: a restart starts without it (documented in docs/operations.md).
Exposure: the TXT record and the policy file come from the internet: the policy text is
parsed by `core.mta_sts`, bounded; the HTTPS fetch has a timeout and a size limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import dns.asyncresolver
import dns.exception
import dns.resolver

from maildetour.core.mta_sts import MAX_POLICY, StsError, StsPolicy, parse_policy, txt_id

log = logging.getLogger("maildetour.delivery")

TlsMode = Literal["none", "opportunistic", "required", "verify"]
TLS_MODES: tuple[TlsMode, ...] = ("none", "opportunistic", "required", "verify")  # weakest first
_MAX_HEAD = 16 * 1024  # response status line and headers of the policy fetch


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    mode: TlsMode
    mx: tuple[str, ...] | None = None  # MTA-STS enforce: only MX hosts matching these
    source: str = "default"  # for reasons: "default", "tls_policy", "destination", "MTA-STS"


class MtaSts:
    """MTA-STS policies of recipient domains, found through `resolver` and cached."""

    def __init__(self, resolver: dns.asyncresolver.Resolver | None, *, context: ssl.SSLContext, port: int,
                 timeout: float, clock: Callable[[], float]) -> None:
        self._resolver, self._context, self._port = resolver, context, port
        self._timeout, self._clock = timeout, clock
        self._cache: dict[str, tuple[StsPolicy, str, float]] = {}  # domain -> (policy, id, expires)
        self._fetching: dict[str, asyncio.Future[StsPolicy | None]] = {}

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy in effect for `domain`, or None."""
        if self._resolver is None:
            return None
        waiting = self._fetching.get(domain)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future: asyncio.Future[StsPolicy | None] = asyncio.get_running_loop().create_future()
        self._fetching[domain] = future
        try:
            found = await self._lookup(domain)
        except Exception:  # a bug here must not stop delivery: as without MTA-STS
            log.exception("MTA-STS lookup for %s failed", domain)
            found = self._cached(domain)
        finally:
            del self._fetching[domain]
        future.set_result(found)
        return found

    def _cached(self, domain: str) -> StsPolicy | None:
        entry = self._cache.get(domain)
        return entry[0] if entry is not None and entry[2] > self._clock() else None

    async def _lookup(self, domain: str) -> StsPolicy | None:
        assert self._resolver is not None
        try:
            answer = await self._resolver.resolve(f"_mta-sts.{domain}", "TXT", lifetime=self._timeout)
            texts = [b"".join(r.strings).decode("ascii", "replace") for r in answer]  # type: ignore[attr-defined]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return self._cached(domain)  # RFC 8461 5.1: a cached policy outlives its TXT record
        except dns.exception.DNSException:
            return self._cached(domain)
        policy_id = txt_id(texts)
        if isinstance(policy_id, StsError):
            return self._cached(domain)
        entry = self._cache.get(domain)
        if entry is not None and entry[1] == policy_id and entry[2] > self._clock():
            return entry[0]
        fetched = await self._fetch(domain)
        if isinstance(fetched, StsError):
            log.warning("MTA-STS policy of %s not used: %s", domain, fetched.reason)
            return self._cached(domain)
        self._cache[domain] = (fetched, policy_id, self._clock() + fetched.max_age)
        return fetched

    async def _fetch(self, domain: str) -> StsPolicy | StsError:
        """GET https://mta-sts.<domain>/.well-known/mta-sts.txt, certificate checked for that
        name, dialling the addresses our resolver gives (never the system's)."""
        host = f"mta-sts.{domain}"
        addresses = await self._addresses(host)
        last = StsError(f"{host} has no address")
        for address in addresses:
            try:
                async with asyncio.timeout(self._timeout):
                    body = await self._get(address, host)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                last = StsError(f"cannot fetch the policy from {host} ({type(exc).__name__})")
                continue
            return body if isinstance(body, StsError) else parse_policy(body)
        return last

    async def _addresses(self, host: str) -> list[str]:
        assert self._resolver is not None
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype, lifetime=self._timeout)
            except dns.exception.DNSException:
                continue
            found += [str(ipaddress.ip_address(r.address)) for r in answer]  # type: ignore[attr-defined]
        return found

    async def _get(self, address: str, host: str) -> str | StsError:
        reader, writer = await asyncio.open_connection(address, self._port, ssl=self._context,
                                                       server_hostname=host)
        try:
            writer.write(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                         "Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii"))
            await writer.drain()
            response = await reader.read(_MAX_HEAD + MAX_POLICY + 1)
            while len(response) <= _MAX_HEAD + MAX_POLICY and (more := await reader.read(65536)):
                response += more
        finally:
            writer.close()
        return _policy_body(response)


def _policy_body(response: bytes) -> str | StsError:
    """The body of an HTTP/1.1 response: 200 only (RFC 8461 3.3: no redirects), text/plain."""
    head, sep, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or parts[1] != "200":
        return StsError(f"the policy server answered {lines[0][:60]!r}")
    headers = {k.strip().lower(): v.strip().lower() for k, _, v in (line.partition(":") for line in lines[1:])}
    if not headers.get("content-type", "").startswith("text/plain"):
        return StsError("the policy is not text/plain")
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return body[:MAX_POLICY].decode("utf-8", "replace")


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2:]
    return out


def tls_mode(text: str) -> TlsMode:
    """A mode the config has already checked is one of TLS_MODES."""
    for mode in TLS_MODES:
        if text == mode:
            return mode
    raise ValueError(f"not a TLS mode: {text!r}")


class TlsPolicies:
    def __init__(self, *, default: str, per_domain: Mapping[str, str], per_address: Mapping[str, str | None],
                 sts: MtaSts | None) -> None:
        """Modes as the config has them (checked there): `per_domain` from `[delivery]
        tls_policy`, `per_address` from the destinations' own `tls`."""
        self._default = tls_mode(default)
        self._per_domain = {domain: tls_mode(mode) for domain, mode in per_domain.items()}
        self._per_address = {address: tls_mode(mode) for address, mode in per_address.items() if mode}
        self._sts = sts

    def key(self, address: str) -> str:
        """Addresses with their own `tls` never share a job with others of their domain."""
        own = self._per_address.get(address.lower())
        return f"tls={own}" if own else ""

    async def policy(self, domain: str, address: str, *, relay: bool = False) -> TlsPolicy:
        """`relay`: the next hop is a configured relay, not the domain's MX: MTA-STS, which
        speaks of the MX hosts, does not apply."""
        own = self._per_address.get(address.lower())
        configured = TlsPolicy(own, source="destination") if own else \
            TlsPolicy(self._per_domain[domain], source="tls_policy") if domain in self._per_domain else \
            TlsPolicy(self._default)
        sts = await self._sts.policy(domain) if self._sts is not None and not relay else None
        if sts is None or sts.mode != "enforce":
            return configured
        return TlsPolicy("verify", sts.mx, "MTA-STS")  # verify is the strongest mode: enforce only adds

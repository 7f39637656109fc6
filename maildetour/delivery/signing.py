"""Agents in front of the SMTP agent that change what a copy carries out: its SRS envelope
sender (`SrsAgent`, always) and its DKIM signature and ARC set (`SigningAgent`, with
`[signing]`).

Internal. `SrsAgent` makes the envelope sender an SRS0/SRS1 address at our SRS domain (the
null sender stays null, so DSNs stay DSNs): SPF at the next hop checks our IP, and anything the
next hop sends back after accepting (a DSN, a delay notice) comes to us, never to the original
sender. `SigningAgent` puts a DKIM-Signature (d= our domain) and the next ARC set (sealing our
inbound verdicts) on top of the stored bytes; the original bytes and signatures below stay
untouched. Keys are read at start-up (`load_keys`; bad keys fail there, not per message).
Signing is CPU work and runs in a thread. If ARC sealing fails (a broken chain that dkimpy
cannot continue), the copy still goes out DKIM-signed and the reason is logged: a missing seal
is better than no delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

from maildetour.config.model import SigningConfig, SrsConfig
from maildetour.core.authres import find_results
from maildetour.core.outcome import Outcome, PermanentFailure
from maildetour.delivery.base import Agent, Job
from maildetour.sign.arc import ArcSealError, seal
from maildetour.sign.dkim import DkimSigner
from maildetour.sign.srs import SrsCodec, load_secrets, make_secret_file
from maildetour.verify.dnsfunc import DnsLookup

log = logging.getLogger("maildetour.delivery")


@dataclass(frozen=True, slots=True)
class SigningKeys:
    domain: str
    selector: str
    dkim: DkimSigner
    arc_key: bytes  # PEM; ARC is RSA-only, so the RSA key of DKIM


def load_keys(signing: SigningConfig) -> SigningKeys:
    """Read the key files. Raises OSError, or ValueError (DkimKeyError) for a file that holds
    no usable key."""
    key = signing.dkim_key.read_bytes()
    ed25519 = None
    if signing.ed25519_key is not None and signing.ed25519_selector is not None:
        ed25519 = (signing.ed25519_selector, signing.ed25519_key.read_bytes().strip())
    return SigningKeys(signing.domain, signing.selector,
                       DkimSigner(signing.domain, signing.selector, key, ed25519_key=ed25519), key)


def load_srs(srs: SrsConfig, *, create: bool) -> SrsCodec:
    """The SRS codec of `srs`; with `create`, a secret made here at the first start is made
    now if it is missing (never overwritten). Raises OSError, or SrsSecretError (ValueError)."""
    if create and srs.made_here:
        make_secret_file(srs.secret_file)
    return SrsCodec(load_secrets(srs.secret_file), srs.domain, hash_length=srs.hash_length)


class SrsAgent:
    """Implements `delivery.base.Agent` around `inner`: the envelope sender of each job
    becomes an SRS address at our domain."""

    def __init__(self, inner: Agent, *, srs: SrsCodec, clock: Callable[[], float]) -> None:
        self.inner, self.srs, self.clock = inner, srs, clock

    def batch_key(self, target: str) -> str:
        return self.inner.batch_key(target)

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        try:
            sender = self.srs.forward(job.mail_from, self.clock()) if job.mail_from else ""
        except ValueError:  # a sender we accepted but cannot rewrite: never send it as it is
            refused = PermanentFailure("cannot make an SRS sender of this envelope sender (local check)",
                                       550, "5.1.7", "the sender address cannot be forwarded")
            return {r: refused for r in job.recipients}
        return await self.inner.deliver(dataclasses.replace(job, mail_from=sender))

    async def close(self) -> None:
        await self.inner.close()


class SigningAgent:
    """Implements `delivery.base.Agent` around `inner`: DKIM and ARC on each job's bytes."""

    def __init__(self, inner: Agent, *, keys: SigningKeys, authserv_id: str, dnsfunc: DnsLookup,
                 clock: Callable[[], float]) -> None:
        self.inner, self.keys = inner, keys
        self.authserv_id, self.dnsfunc, self.clock = authserv_id, dnsfunc, clock

    def batch_key(self, target: str) -> str:
        return self.inner.batch_key(target)

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        """A message dkimpy cannot sign (a sender can write such headers, e.g. "Subject : x")
        goes out unsigned rather than not at all: the outcome's reason says so."""
        try:
            headers = await asyncio.to_thread(self._headers, job.data, self.clock())
        except Exception as exc:
            log.warning("copy of %s goes out without DKIM/ARC: signing failed (%s)", job.queue_id,
                        type(exc).__name__)
            outcomes = await self.inner.deliver(job)
            note = f" (sent without DKIM/ARC: signing failed, {type(exc).__name__})"
            return {r: dataclasses.replace(o, reason=o.reason + note) for r, o in outcomes.items()}
        return await self.inner.deliver(dataclasses.replace(job, data=headers + job.data))

    async def close(self) -> None:
        await self.inner.close()

    def _headers(self, data: bytes, now: float) -> bytes:
        dkim = self.keys.dkim.sign(data)
        results = find_results(data, self.authserv_id) or f"{self.authserv_id}; none"
        try:
            arc = seal(dkim + data, domain=self.keys.domain, selector=self.keys.selector,
                       private_key_pem=self.keys.arc_key, authserv_id=self.authserv_id,
                       results=results, now=now, dnsfunc=self.dnsfunc)
        except (ArcSealError, ValueError) as exc:
            log.warning("no ARC seal on a forwarded copy: %s", exc)
            arc = b""
        return arc + dkim

"""Signing agent: in front of the SMTP agent, each job leaves with an SRS sender, a DKIM
signature and an ARC set.

Internal. Built only when `[signing]` is configured (`load_keys` reads its files at start-up;
bad keys fail there, not per message). For each job the envelope sender becomes an SRS0/SRS1
address at our domain (the null sender stays null, so DSNs stay DSNs), and a DKIM-Signature
(d= our domain) and the next ARC set (sealing our inbound verdicts) go on top of the stored
bytes; the original bytes and signatures below stay untouched. Signing is CPU work and runs in
a thread. If ARC sealing fails (a broken chain that dkimpy cannot continue), the copy still
goes out DKIM-signed and the reason is logged: a missing seal is better than no delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

from maildetour.config.model import SigningConfig
from maildetour.core.authres import find_results
from maildetour.core.outcome import Outcome
from maildetour.delivery.base import Agent, Job
from maildetour.sign.arc import ArcSealError, seal
from maildetour.sign.dkim import DkimSigner
from maildetour.sign.srs import SrsCodec, load_secrets
from maildetour.verify.dnsfunc import DnsLookup

log = logging.getLogger("maildetour.delivery")


@dataclass(frozen=True, slots=True)
class SigningKeys:
    domain: str
    selector: str
    srs: SrsCodec
    dkim: DkimSigner
    arc_key: bytes  # PEM; ARC is RSA-only, so the RSA key of DKIM


def load_keys(signing: SigningConfig) -> SigningKeys:
    """Read the key and secret files. Raises OSError, or ValueError (DkimKeyError,
    SrsSecretError) for a file that holds no usable key."""
    key = signing.dkim_key.read_bytes()
    ed25519 = None
    if signing.ed25519_key is not None and signing.ed25519_selector is not None:
        ed25519 = (signing.ed25519_selector, signing.ed25519_key.read_bytes().strip())
    return SigningKeys(signing.domain, signing.selector,
                       SrsCodec(load_secrets(signing.srs_secret_file), signing.domain),
                       DkimSigner(signing.domain, signing.selector, key, ed25519_key=ed25519), key)


class SigningAgent:
    """Implements `delivery.base.Agent` around `inner`."""

    def __init__(self, inner: Agent, *, keys: SigningKeys, authserv_id: str, dnsfunc: DnsLookup,
                 clock: Callable[[], float]) -> None:
        self.inner, self.keys = inner, keys
        self.authserv_id, self.dnsfunc, self.clock = authserv_id, dnsfunc, clock

    def batch_key(self, target: str) -> str:
        return self.inner.batch_key(target)

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        now = self.clock()
        sender = self.keys.srs.forward(job.mail_from, now) if job.mail_from else ""
        headers = await asyncio.to_thread(self._headers, job.data, now)
        return await self.inner.deliver(dataclasses.replace(job, mail_from=sender, data=headers + job.data))

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

"""What a forwarded copy carries when it leaves by SMTP: SRS sender, DKIM signature, ARC set.

Internal. Built only when `[signing]` is configured. `prepare` rewrites the envelope sender to
an SRS0/SRS1 address at our domain (the null sender stays null, so DSNs stay DSNs), then puts a
DKIM-Signature (d= our domain) and the next ARC set (sealing our inbound verdicts) on top of the
stored bytes; the original bytes and signatures below stay untouched. Signing is CPU work and
runs in a thread. If ARC sealing fails (a broken chain that dkimpy cannot continue), the copy
still goes out DKIM-signed and the reason is logged: a missing seal is better than no delivery.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from maildetour.config.model import SigningConfig
from maildetour.core.authres import find_results
from maildetour.sign.arc import ArcSealError, seal
from maildetour.sign.dkim import DkimSigner
from maildetour.sign.dnsfunc import DnsLookup
from maildetour.sign.srs import SrsCodec, load_secrets

log = logging.getLogger("maildetour.delivery")


@dataclass(frozen=True, slots=True)
class Prepared:
    mail_from: str
    data: bytes


class Outgoing:
    def __init__(self, *, srs: SrsCodec, signer: DkimSigner, arc_key: bytes, domain: str,
                 selector: str, authserv_id: str, dnsfunc: DnsLookup, clock: Callable[[], float]) -> None:
        self.srs, self.signer, self.arc_key = srs, signer, arc_key
        self.domain, self.selector, self.authserv_id = domain, selector, authserv_id
        self.dnsfunc, self.clock = dnsfunc, clock

    @classmethod
    def from_config(cls, signing: SigningConfig, *, authserv_id: str, dnsfunc: DnsLookup,
                    clock: Callable[[], float]) -> "Outgoing":
        """Reads the key files; raises OSError/ValueError (DkimKeyError, SrsSecretError)."""
        key = signing.dkim_key.read_bytes()
        ed25519 = None
        if signing.ed25519_key is not None and signing.ed25519_selector is not None:
            ed25519 = (signing.ed25519_selector, _read_seed(signing.ed25519_key))
        return cls(srs=SrsCodec(load_secrets(signing.srs_secret_file), signing.domain),
                   signer=DkimSigner(signing.domain, signing.selector, key, ed25519_key=ed25519),
                   arc_key=key, domain=signing.domain, selector=signing.selector,
                   authserv_id=authserv_id, dnsfunc=dnsfunc, clock=clock)

    async def prepare(self, mail_from: str, data: bytes) -> Prepared:
        now = self.clock()
        sender = self.srs.forward(mail_from, now) if mail_from else ""
        headers = await asyncio.to_thread(self._headers, data, now)
        return Prepared(sender, headers + data)

    def _headers(self, data: bytes, now: float) -> bytes:
        dkim = self.signer.sign(data)
        results = find_results(data, self.authserv_id) or f"{self.authserv_id}; none"
        try:
            arc = seal(dkim + data, domain=self.domain, selector=self.selector,
                       private_key_pem=self.arc_key, authserv_id=self.authserv_id,
                       results=results, now=now, dnsfunc=self.dnsfunc)
        except (ArcSealError, ValueError) as exc:
            log.warning("no ARC seal on a forwarded copy: %s", exc)
            arc = b""
        return arc + dkim


def _read_seed(path: Path) -> bytes:
    return path.read_bytes().strip()

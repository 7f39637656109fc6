"""Outbound SMTP delivery agent: one `Job` -> one transaction at the next hop -> an outcome per
recipient.

Internal, but it talks to remote (untrusted) SMTP servers: their replies become the private
reason of an outcome (see `core.classify`), never text for a sender; exception texts are never
copied anywhere (`smtp_errors`).
Contract: `deliver(job)` returns an outcome for every recipient and never raises for remote or
network trouble. Behaviour: the TLS the next hop must give comes from `tls_policy` (config,
then MTA-STS, whose `enforce` also limits the MX hosts); next hops from `NextHopResolver` are
tried in order until one greets us (connection, greeting, EHLO and STARTTLS are
`smtp_pool`'s); then one transaction:
MAIL, one RCPT per recipient (each its own outcome), DATA and the message, or BDAT LAST with
it when the next hop offers CHUNKING (RFC 3030; the reply applies to every accepted
recipient) — in one write when the next hop offers PIPELINING (RFC 2920; a RSET ahead of MAIL
when the reused session is not clean), else one command per reply; the rules are
`smtp_pipeline`'s (pure), the bytes go through `smtp_exchange` on the session's connection.
8BITMIME is used, BINARYMIME never. A session reused without a lock-step RSET that the server
closed meanwhile is tried once more on a fresh connection (only when no reply at all came, so
nothing can have been sent twice).
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from typing import Mapping

from maildetour.config.model import DeliveryConfig
from maildetour.core.classify import classify_reply
from maildetour.core.hostport import HostPort
from maildetour.core.mta_sts import mx_matches
from maildetour.core.outcome import (
    Outcome,
    PermanentFailure,
    TemporaryFailure,
    Unreachable,
)
from maildetour.delivery.base import Job
from maildetour.delivery.nexthop import DnsTemporary, NextHopResolver, NextHops, NoHost
from maildetour.delivery.smtp_errors import Disconnected, outcome_for_error, where
from maildetour.delivery.smtp_exchange import carry
from maildetour.delivery.smtp_pipeline import (
    Transaction,
    Unsendable,
    parameters,
    sendable,
)
from maildetour.delivery.smtp_pool import Lease, Session, SmtpPool
from maildetour.delivery.tls_policy import TlsMode, TlsPolicies


def _combine(failures: list[Outcome]) -> Outcome:
    """One outcome for a job no next hop took: temporary if any host may work later."""
    for kind in (TemporaryFailure, PermanentFailure):
        for failure in failures:
            if isinstance(failure, kind):
                return failure
    reasons = "; ".join(f.reason for f in failures if isinstance(f, Unreachable))
    return Unreachable(reasons or "no next hop")


def _local_refusal(code: int, status: str, text: str, public: str) -> PermanentFailure:
    """A copy we refuse to send ourselves, because the next hop could never take it."""
    return PermanentFailure(f"{code} {status} {text} (local check)", code, status, public)


class SmtpAgent:
    """Delivers jobs over SMTP; implements `delivery.base.Agent`."""

    def __init__(self, *, local_hostname: str, nexthop: NextHopResolver, settings: DeliveryConfig,
                 policies: TlsPolicies, verify_context: ssl.SSLContext) -> None:
        self._nexthop, self._policies = nexthop, policies
        self._command_timeout, self._data_timeout = settings.command_timeout, settings.data_timeout
        self._pool = SmtpPool(
            local_hostname=local_hostname, verify_context=verify_context,
            connect_timeout=settings.connect_timeout, command_timeout=settings.command_timeout,
            idle_timeout=settings.connection_idle_timeout, max_per_host=settings.max_connections_per_host)

    def batch_key(self, target: str) -> str:
        """Copies of one message to one domain share a transaction (unless one of them has a TLS
        policy of its own)."""
        return target.rpartition("@")[2].lower() + self._policies.key(target)

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        started = time.monotonic()
        results: dict[str, Outcome] = {}
        for rcpt in job.recipients:
            if "@" not in rcpt or not sendable(rcpt):
                results[rcpt] = _local_refusal(553, "5.1.3", "recipient address cannot be sent by SMTP",
                                               "the address cannot be used in SMTP")
        pending = [r for r in job.recipients if r not in results]
        if pending and not sendable(job.mail_from):
            refused = _local_refusal(553, "5.1.7", "sender address cannot be sent by SMTP",
                                     "the sender address cannot be used in SMTP")
            results.update((r, refused) for r in pending)
            pending = []
        by_domain: dict[tuple[str, str], list[str]] = {}
        for rcpt in pending:  # a job normally has one domain and policy; be robust to more
            by_domain.setdefault((rcpt.rpartition("@")[2].lower(), self._policies.key(rcpt)), []).append(rcpt)
        for (domain, _), rcpts in by_domain.items():
            part = dataclasses.replace(job, recipients=tuple(dict.fromkeys(rcpts)))
            match await self._nexthop.resolve(domain):
                case NoHost(reason) if "null MX" in reason:  # RFC 7505 3.2
                    refused = PermanentFailure(f"556 5.1.10 {reason}", 556, "5.1.10",
                                               "the recipient's domain accepts no mail")
                    results.update((r, refused) for r in part.recipients)
                case NoHost(reason):  # NXDOMAIN, no MX and no A: refused for good (RFC 3463)
                    refused = PermanentFailure(f"550 5.1.2 {reason}", 550, "5.1.2",
                                               "the recipient's domain has no mail host")
                    results.update((r, refused) for r in part.recipients)
                case DnsTemporary(reason):
                    later = TemporaryFailure(reason, 451, "4.4.3",
                                             "the receiving system could not be looked up")
                    results.update((r, later) for r in part.recipients)
                case NextHops(hosts, relay):
                    policy = await self._policies.policy(domain, rcpts[0], relay=relay)
                    allowed = tuple(h for h in hosts if policy.mx is None or mx_matches(policy.mx, h.name))
                    if not allowed:
                        later = TemporaryFailure(f"no MX host of {domain} matches its MTA-STS policy "
                                                 f"({', '.join(policy.mx or ())})", 451, "4.7.5",
                                                 "no secure connection to the receiving system")
                        results.update((r, later) for r in part.recipients)
                        continue
                    await self._via(allowed, part, results, policy.mode, started)
        return {r: results[r] for r in job.recipients}

    async def close(self) -> None:
        await self._pool.close()

    async def _via(self, hosts: tuple[HostPort, ...], job: Job, results: dict[str, Outcome],
                   mode: TlsMode, started: float) -> None:
        """Try `hosts` in order until one greets us (with TLS as `mode` asks); run the
        transaction there. Outcomes say where (`relay`) and how long it took to get there
        (`connect`, from `started`)."""
        failures: list[Outcome] = []
        for hop in hosts:
            async with self._pool.slot(hop, mode) as lease:
                match await lease.checkout():
                    case Session() as session:
                        connect = time.monotonic() - started
                        await self._run(lease, session, job, results)
                        relay = where(session.hop)
                        for r in job.recipients:
                            results[r] = dataclasses.replace(results[r], relay=results[r].relay or relay,
                                                             connect=connect)
                        return
                    case failure:
                        failures.append(failure)
        outcome = dataclasses.replace(_combine(failures), relay=where(hosts[-1]),
                                      connect=time.monotonic() - started)
        results.update((r, outcome) for r in job.recipients if r not in results)

    async def _run(self, lease: Lease, session: Session, job: Job,
                   results: dict[str, Outcome]) -> None:
        reusable = False
        try:
            reusable = await self._transaction(session, job, results)
        except Disconnected as exc:
            if session.unchecked and not results:
                # The server closed the idle session just before we reused it: once more, on a
                # fresh connection (checked in by the inner call; this one is closed below).
                session.smtp.close()
                fresh = await lease.open()
                if isinstance(fresh, Session):
                    await self._run(lease, fresh, job, results)
                else:
                    results.update((r, fresh) for r in job.recipients if r not in results)
                return
            outcome = outcome_for_error(exc, where(session.hop))
            results.update((r, outcome) for r in job.recipients if r not in results)
        except Exception as exc:  # network trouble mid-transaction
            outcome = outcome_for_error(exc, where(session.hop))
            results.update((r, outcome) for r in job.recipients if r not in results)
        finally:  # also on cancellation: then the session is closed, not pooled
            lease.checkin(session, reusable)

    async def _transaction(self, session: Session, job: Job, results: dict[str, Outcome]) -> bool:
        """MAIL, RCPT each, DATA and the message or BDAT LAST with it (pipelined when offered).
        Fills `results`; returns whether the session can be reused."""
        smtp = session.smtp
        session.clean = False
        ext = smtp.esmtp_extensions
        plan = parameters(ext, job.mail_from, job.recipients, job.data)
        if isinstance(plan, Unsendable):
            refusal = _local_refusal(plan.code, plan.status, plan.text, plan.public)
            results.update((r, refusal) for r in job.recipients)
            return True
        transaction = Transaction(job.mail_from, job.recipients, plan.options, data=job.data, utf8=plan.utf8,
                                  pipelining="pipelining" in ext, chunking="chunking" in ext,
                                  reset=session.reset_first)
        session.reset_first = False
        step, idle = await carry(session, transaction, command_timeout=self._command_timeout,
                                 data_timeout=self._data_timeout)
        reusable = idle and not step.closing
        session.clean = step.clean
        results.update((r, classify_reply(answer.code, answer.text)) for r, answer in step.replies.items())
        return reusable and smtp.is_connected

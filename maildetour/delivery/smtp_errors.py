"""Outbound SMTP trouble -> outcomes: the one place foreign exceptions become values.

Pure mapping (no I/O), used by the connection pool (`smtp_pool`) and the transaction
(`smtp_out`). Reasons are our own words plus the place (`name[address]:port`), never
`str(exc)`: a library's text is not ours to pass on, even to the operator. The order of
decisions: an SMTP reply -> `classify_reply`; TLS that was wanted and failed, timeouts,
dropped connections, bytes that are not SMTP replies (`smtp_pipeline`) -> temporary;
connection refused or no route -> unreachable; any other OSError or DNS error -> temporary;
anything unknown -> temporary.
"""

from __future__ import annotations

import errno
import ssl

import dns.exception
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPConnectTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from maildetour.core.classify import classify_reply
from maildetour.core.hostport import HostPort
from maildetour.core.outcome import Outcome, TemporaryFailure, Unreachable
from maildetour.delivery.smtp_pipeline import MalformedReply

_UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL,
     errno.EAFNOSUPPORT}
)


class TlsFailed(Exception):
    """STARTTLS was wanted and did not work; the cause is chained."""


class Disconnected(Exception):
    """The connection ended (or was already closed) before the reply we waited for."""


def where(hop: HostPort) -> str:
    """Postfix style: name[address]:port."""
    name = "" if hop.name == hop.host else hop.name
    return f"{name}[{hop.host}]:{hop.port}"


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def outcome_for_error(exc: BaseException, place: str) -> Outcome:
    """The outcome standing for `exc`, raised while talking to `place`."""
    cause = exc.__cause__
    match exc:
        case SMTPResponseException(code=code, message=message):
            return classify_reply(code, message)  # greeting, EHLO or STARTTLS refused
        case TlsFailed():
            kind = type(cause).__name__ if cause is not None else "STARTTLS not offered"
            return TemporaryFailure(f"{place}: TLS failed ({kind})", 451, "4.7.5",
                                    "no secure connection to the receiving system")
        case SMTPConnectTimeoutError():
            return TemporaryFailure(f"{place}: timed out connecting or waiting for greeting", 451,
                                    "4.4.1", "the receiving system did not answer")
        case SMTPTimeoutError() | TimeoutError():
            return TemporaryFailure(f"{place}: timed out waiting for a reply", 451, "4.4.2",
                                    "the receiving system stopped answering")
        case SMTPConnectError() if isinstance(cause, OSError) and not isinstance(
            cause, SMTPServerDisconnected
        ):
            return outcome_for_error(cause, place)
        case SMTPConnectError() | SMTPServerDisconnected() | Disconnected():
            return TemporaryFailure(f"{place}: connection lost", 451, "4.4.2",
                                    "the connection to the receiving system was lost")
        case MalformedReply():
            return TemporaryFailure(f"{place}: malformed reply", 451, "4.5.0",
                                    "unexpected reply from the receiving system")
        case ssl.SSLError() | ssl.CertificateError():
            return TemporaryFailure(f"{place}: TLS error ({type(exc).__name__})", 451, "4.7.5",
                                    "no secure connection to the receiving system")
        case OSError() if exc.errno in _UNREACHABLE_ERRNOS:
            return Unreachable(f"{place}: {_errno_name(exc)}")
        case ConnectionRefusedError():
            return Unreachable(f"{place}: connection refused")
        case OSError():
            return TemporaryFailure(f"{place}: network error ({_errno_name(exc)})", 451, "4.4.0",
                                    "a network error on the way to the receiving system")
        case dns.exception.DNSException():
            return TemporaryFailure(f"{place}: DNS error ({type(exc).__name__})", 451, "4.4.3",
                                    "the receiving system could not be looked up")
        case _:
            return TemporaryFailure(f"{place}: unexpected error ({type(exc).__name__})")

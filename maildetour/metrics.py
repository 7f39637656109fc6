"""What the server counts, for Prometheus: one registry per process, and plain methods to count with.

Internal; the numbers are operator-facing (`metrics_endpoint` serves them on `[metrics] listen`).
`Metrics` owns a `prometheus_client.CollectorRegistry` of its own (never the library's global
default) and offers the rest of the code plain calls: `accepted` and `refused` (SMTP in),
`settled` (what each attempt of a copy led to, with latency and detour cause), `pop3_login`,
`late_bounce`, and `watch_queue` for the gauges read from the scheduler at scrape time. The parts
that count take `metrics: Metrics | None` (None: nothing counted).
Label values come from fixed small sets, so no client, sender or remote text can grow the
number of series: refusal reasons from our own replies (`core.replies`), statuses and detour
causes from the decision, and a destination label only for configured `[destination."..."]`
addresses (hidden ones included: this is for the operator), "other" for any other target.
Fails never: counting cannot raise into the mail path; `exposition` renders the text format or,
when asked for it, OpenMetrics.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_TYPE,
)
from prometheus_client.openmetrics.exposition import (
    generate_latest as generate_openmetrics,
)

from maildetour.core import replies
from maildetour.core.outcome import (
    Outcome,
    PermanentFailure,
    TemporaryFailure,
    Unreachable,
)

OTHER = "other"  # the destination label of every target that is no configured destination

# What each attempt of a copy led to (the server log's status=), and why a copy detoured.
STATUSES = ("sent", "deferred", "detoured", "bounced", "quarantined", "failed")
CAUSES = ("refused", "unreachable", "deferred_too_long", "skip_when", "late_bounce")
POP3_RESULTS = ("ok", "failed", "throttled", "in_use", "unavailable")
LATE_BOUNCE_RESULTS = ("matched", "unmatched")

# Our own replies, by the reason a refusal is counted under. Replies not named here are
# counted by their enhanced status code (`refusal_reason`).
_NAMED: dict[str, tuple[replies.Reply, ...]] = {
    "unknown_user": (replies.UNKNOWN_USER,),
    "relay_denied": (replies.RELAY_DENIED,),
    "bad_address": (replies.BAD_RECIPIENT, replies.BAD_SENDER, replies.SOURCE_ROUTE, replies.ADDRESS_FORM),
    "too_many_recipients": (replies.TOO_MANY_RECIPIENTS,),
    "too_big": (replies.TOO_BIG,),
    "bare_newline": (replies.BARE_CR_LF, replies.BARE_LF_COMMAND),
    "line_too_long": (replies.LINE_TOO_LONG,),
    "too_many_connections": (replies.TOO_MANY_SESSIONS, replies.CLIENT_SESSIONS, replies.CLIENT_CONNECTION_RATE),
    "session_limit": (replies.NO_PROGRESS, replies.SESSION_TIME, replies.SESSION_REFUSED, replies.DATA_TOO_SLOW),
    "rate_limit": (replies.CLIENT_REFUSED, replies.CLIENT_MESSAGE_RATE, replies.CLIENT_RECIPIENT_RATE,
                   replies.DOMAIN_MESSAGE_RATE, replies.DOMAIN_RECIPIENT_RATE),
    "no_storage": (replies.NO_STORAGE,),
    "internal_error": (replies.INTERNAL_ERROR,),
    "protocol": (replies.SEPARATE_BOUNCES,),
}
_BY_REPLY = {str(reply): reason for reason, named in _NAMED.items() for reply in named}
# Enhanced status codes (RFC 3463) of replies we did not name, e.g. the library's own.
_BY_STATUS = {"5.1.1": "unknown_user", "5.1.3": "bad_address", "5.1.7": "bad_address", "5.3.4": "too_big",
              "4.7.0": "session_limit", "4.7.1": "rate_limit", "4.3.1": "no_storage", "4.3.0": "internal_error"}
REFUSAL_REASONS = (*_NAMED, OTHER)

# Seconds from acceptance to delivery: a local mailbox takes milliseconds, a next hop that
# answers at once well under a second; retries and detours take minutes to days.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
                   4 * 3600.0, 86400.0)


def refusal_reason(status: str) -> str:
    """The reason a refusal (a 4xx/5xx reply line we sent) is counted under."""
    line = status.rstrip("\r\n")
    if line in _BY_REPLY:
        return _BY_REPLY[line]
    if line.startswith("500 5.5.2") and "too long" in line:
        return "line_too_long"
    enhanced = line[4:].split(" ", 1)[0]
    if enhanced in _BY_STATUS:
        return _BY_STATUS[enhanced]
    if enhanced[:4] in ("5.5.", "4.5."):
        return "protocol"  # syntax, command order, unknown parameters
    return OTHER


def detour_cause(outcome: Outcome) -> str:
    """Why a copy detoured, from the outcome its step reported (`core.policy`: a refusal or an
    unreachable host detours at once; temporary failures once they lasted `detour_after`)."""
    match outcome:
        case PermanentFailure(reason=reason) if reason.startswith("late bounce "):
            return "late_bounce"  # delivery.bounces: refused after it had accepted
        case PermanentFailure(reason=reason) if reason.endswith("(skip_when)"):
            return "skip_when"  # core.policy.skipped: not tried at all
        case PermanentFailure():
            return "refused"
        case Unreachable():
            return "unreachable"
        case TemporaryFailure():
            return "deferred_too_long"
    return OTHER


class Metrics:
    """Every metric of one process. Lives as long as the process (a reload keeps the counts);
    `configure` gives it the destinations of a new config."""

    def __init__(self, destinations: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._accepted = Counter("maildetour_smtp_accepted_messages", "Messages accepted at SMTP (250 after "
                                 "DATA, once stored), late-bounce DSNs included", registry=r)
        self._recipients = Counter("maildetour_smtp_accepted_recipients",
                                   "Recipients of the messages accepted at SMTP", registry=r)
        self._refused = Counter("maildetour_smtp_refused", "Refusals (4xx/5xx replies) sent to SMTP clients, "
                                "by reason", ["reason"], registry=r)
        self._copies = Counter("maildetour_copies", "What each delivery attempt of a copy led to, by status "
                               "(sent, deferred, detoured, bounced, quarantined, failed) and destination",
                               ["status", "destination"], registry=r)
        self._detours = Counter("maildetour_detours", "Copies sent down their detour, by the destination that "
                                "failed and the cause", ["destination", "cause"], registry=r)
        self._delivery = Histogram("maildetour_delivery_latency_seconds", "From acceptance to delivery, "
                                   "copies delivered without a detour", registry=r, buckets=LATENCY_BUCKETS)
        self._detour = Histogram("maildetour_detour_latency_seconds", "From acceptance to delivery, copies "
                                 "delivered after one or more detours", registry=r, buckets=LATENCY_BUCKETS)
        self._logins = Counter("maildetour_pop3_logins", "POP3 login attempts, by result", ["result"], registry=r)
        self._late = Counter("maildetour_late_bounces", "DSNs that came back to our SRS addresses, by whether "
                             "they matched a copy we delivered", ["result"], registry=r)
        self._depth = Gauge("maildetour_queue_copies", "Copies queued for delivery (due or waiting to retry)",
                            registry=r)
        self._oldest = Gauge("maildetour_queue_oldest_age_seconds",
                             "Age of the oldest queued copy's message (0 with an empty queue)", registry=r)
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason)
        for result in POP3_RESULTS:
            self._logins.labels(result)
        for result in LATE_BOUNCE_RESULTS:
            self._late.labels(result)
        self._destinations: frozenset[str] = frozenset()
        self.configure(destinations)

    def configure(self, destinations: Iterable[str]) -> None:
        """The configured destinations (at start and on each reload): the only targets that
        get a destination label of their own."""
        self._destinations = frozenset(d.lower() for d in destinations)

    def destination(self, target: str) -> str:
        key = target.lower()
        return key if key in self._destinations else OTHER

    def watch_queue(self, depth: Callable[[], float], oldest_age: Callable[[], float]) -> None:
        """Read the queue's depth and its oldest copy's age from these at each scrape."""
        self._depth.set_function(depth)
        self._oldest.set_function(oldest_age)

    # --- counting -----------------------------------------------------------------------------
    def accepted(self, recipients: int) -> None:
        self._accepted.inc()
        self._recipients.inc(recipients)

    def refused(self, status: str) -> None:
        """A refusal sent to an SMTP client: the reply line as sent."""
        self._refused.labels(refusal_reason(status)).inc()

    def settled(self, status: str, target: str, outcome: Outcome | None = None, *, latency: float = 0.0,
                detours: int = 0) -> None:
        """An attempt of a copy at `target` led to `status` (one of STATUSES); `latency`:
        seconds since its message was accepted; `detours`: detours it had taken before."""
        destination = self.destination(target)
        self._copies.labels(status, destination).inc()
        if status == "detoured" and outcome is not None:
            self._detours.labels(destination, detour_cause(outcome)).inc()
        elif status == "sent":
            (self._detour if detours else self._delivery).observe(max(latency, 0.0))

    def pop3_login(self, result: str) -> None:
        """One of POP3_RESULTS."""
        self._logins.labels(result).inc()

    def late_bounce(self, matched: bool) -> None:
        self._late.labels("matched" if matched else "unmatched").inc()


def exposition(metrics: Metrics, accept: str) -> tuple[bytes, str]:
    """The metrics as bytes and their content type: OpenMetrics when the Accept header asks
    for it, else Prometheus' text format."""
    if "application/openmetrics-text" in accept:
        return generate_openmetrics(metrics.registry), OPENMETRICS_TYPE
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST

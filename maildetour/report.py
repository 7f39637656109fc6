"""Text for operators: the routing table (`check`), one address (`route`), one message's
story (`trace`), the queue (`queue list`, as text like `postqueue -p` or JSON lines like
`postqueue -j`) and one queued message (`queue show`).

Pure: values in (from the config, the routing table and the store), text out. Operator-facing
only: it shows hidden addresses, because the operator configured them; nothing here is sent
to a sender.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Mapping

from maildetour.config.model import Config, ImapAccount, StoreConfig
from maildetour.core.destinations import IMAP_PREFIX, detour_chain, is_imap
from maildetour.core.routing import Accept, Route, RoutingTable
from maildetour.store.listing import REPLY_KINDS, ListedCopy, QueueListing
from maildetour.store.records import Event, Story
from maildetour.store.retention import RetentionReport


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def mailbox_kind(config: Config) -> str:
    """How a mailbox copy is stored: in our Maildir, or by LMTP at the mail store."""
    lmtp = config.delivery.lmtp
    return "local mailbox" if lmtp is None else f"mailbox by LMTP to {lmtp}"


def describe_target(table: RoutingTable, target: str, imap: Mapping[str, ImapAccount], *,
                    mailbox: str = "local mailbox") -> str:
    """`ituki-ex@gmail.com (smtp, hidden, detour after 600s of 4xx) -> detour imap:gmail (...)`:
    every step of the target's detour chain, what it is (`mailbox`: what a mailbox step is
    called), and when the copy moves on."""
    chain = detour_chain(table.destinations, target)
    hidden = False
    parts = []
    for i, step in enumerate(chain.steps):
        hidden = hidden or table.is_hidden(step.target)
        kind = {"local": mailbox, "smtp": "smtp", "imap": "imap"}[table.kind(step.target)]
        account = imap.get(step.target.removeprefix(IMAP_PREFIX)) if is_imap(step.target) else None
        if account is not None:
            kind += f" {account.user} at {account.host}:{account.port} {account.folder}"
        flags = ", hidden" if table.is_hidden(step.target) else ""
        after = f", detour after {step.deadline:g}s of 4xx" if step.deadline is not None else ""
        parts.append(("" if i == 0 else "detour ") + f"{step.target} ({kind}{flags}{after})")
    text = " -> ".join(parts)
    if hidden and len(parts) == 1:
        text += " -> refused copies are quarantined (no detour configured)"
    elif hidden:
        text += " -> quarantine if the last step refuses too (4xx there: retried until delivered)"
    elif len(parts) > 1:
        text += " -> a private DSN if the last step refuses too"
    return text


def routing_table(config: Config) -> str:
    table = config.routing_table()
    mailbox = mailbox_kind(config)
    lmtp = config.delivery.lmtp
    stored = ("Maildirs in the state dir" if lmtp is None else
              f"stored by the LMTP server {lmtp}, which (or its IMAP/POP3 server) serves them")
    lines = [f"config {config.path}: OK", f"hostname  {config.server.hostname}",
             f"state dir {config.server.state_dir}",
             f"domains   {', '.join(sorted(table.domains)) or '(none)'}", "", f"mailboxes ({stored}):"]
    lines += [f"  {address}" for address in sorted(table.mailboxes)] or ["  (none)"]
    lines += ["", "forwards (first match wins: exact, mailbox, plus-address, catch-all):"]
    for rule in config.forwards:
        lines.append(f"  {rule.pattern}")
        lines += [f"    -> {describe_target(table, target, config.imap, mailbox=mailbox)}" for target in rule.to]
    if not config.forwards:
        lines.append("  (none)")
    lines += ["", "destinations:"]
    for address, dest in sorted(config.destinations.items()):
        lines.append(f"  {describe_target(table, address, config.imap, mailbox=mailbox)}")
    if not config.destinations:
        lines.append("  (none)")
    lines += ["", "imap accounts:"]
    lines += [f"  imap:{name}  {a.user} at {a.host}:{a.port} ({a.tls} TLS), folder {a.folder}, auth {a.auth}"
              for name, a in sorted(config.imap.items())] or ["  (none)"]
    relay = config.delivery.relay
    lines += ["", "next hops: " + (", ".join(f"{d} -> {hp}" for d, hp in sorted(relay.items())) or "")
              + ("; " if relay else "") + "others by MX lookup"]
    srs = config.srs
    if srs is None:
        lines.append("srs: off (no domain to rewrite senders to)")
    else:
        made = ", made at the first start" if srs.made_here and not srs.secret_file.exists() else ""
        lines.append(f"srs: on, every copy that leaves by SMTP has an SRS sender at {srs.domain} "
                     f"(secret {srs.secret_file}{made})")
    return "\n".join(lines)


def route_story(table: RoutingTable, found: Route, imap: Mapping[str, ImapAccount], *,
                mailbox: str = "local mailbox") -> str:
    if isinstance(found, Accept):
        lines = [f"{found.recipient}: accepted ({found.why})"]
        lines += [f"  -> {describe_target(table, t, imap, mailbox=mailbox)}" for t in found.targets]
        return "\n".join(lines)
    return f"refused at RCPT with \"{found.reply}\" ({found.why})"


def trace(story: Story) -> str:
    m = story.message
    lines = [f"message {m.queue_id}  received {_when(m.received_at)}",
             f"  from <{m.mail_from}>  client {m.client}  size {m.size}",
             f"  Message-ID {m.message_id or '(none)'}", "copies:"]
    for c in story.copies:
        lines.append(f"  #{c.id} for {c.recipient} -> {c.target}: {c.state}"
                     + (f" (after {c.detours} detour{'s' * (c.detours != 1)})" if c.detours else "")
                     + (f", next attempt {_when(c.next_at)}" if c.state == "queued" else ""))
    lines.append("events:")
    for e in story.events:
        copy = f"#{e.copy_id} " if e.copy_id is not None else ""
        lines.append(f"  {_when(e.at)} {copy}{e.kind:<11} {e.target}  {e.detail}")
    return "\n".join(lines)


# --- the queue (`maildetour queue list|show`) -------------------------------------------------
QUEUE_HEADING = (f"{'-Queue ID-':-<17} {'--Size--':>8} {'----Arrival Time----':<20} {'--Age--':>7}"
                 "  -Sender/Copies-------------")


def _second(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def age(seconds: float) -> str:
    """`45s`, `12m`, `2h05m`, `3d04h`: how long a message has been here, at a glance."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _plural(n: int, word: str, words: str = "") -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


def _copy_lines(listed: ListedCopy) -> list[str]:
    """`#6 ituki-ex@gmail.com  queued, 3 attempts, next attempt ...`, whom it is for, and the
    last reply in parentheses (like postqueue's delay reason)."""
    c = listed.copy
    status = f"{c.state}, {_plural(c.attempts, 'attempt')}"
    if c.state == "queued":
        status += f", next attempt {_second(c.next_at)}"
    if listed.in_flight_since is not None:
        status += f", in flight since {_second(listed.in_flight_since)}"
    lines = [f"  #{c.id} {c.target}  {status}"]
    via = [f"for {c.recipient}"] if c.recipient.lower() != c.target.lower() else []
    if c.detours:
        via.append(f"after {_plural(c.detours, 'detour')} from {c.origin}")
    if via:
        lines.append("     " + ", ".join(via))
    if listed.last_reply is not None:
        r = listed.last_reply
        lines.append(f"     ({r.kind} {_second(r.at)}: {r.detail})")
    return lines


def queue_listing(listing: QueueListing, now: float) -> str:
    """Like `postqueue -p`: a block per message, its matching copies, the totals; and a line
    saying so when the limit cut the listing."""
    lines = [QUEUE_HEADING]
    for listed in listing.messages:
        m = listed.message
        lines += ["", f"{m.queue_id:<17} {m.size:>8} {_second(m.received_at):<20} {age(now - m.received_at):>7}"
                      f"  <{m.mail_from}>"]
        for c in listed.copies:
            lines += _copy_lines(c)
    kbytes = (listing.matched_bytes + 1023) // 1024
    lines += ["", f"-- {kbytes} Kbytes in {_plural(listing.matched_messages, 'message')}, "
                  f"{_plural(listing.matched_copies, 'copy', 'copies')}."]
    if listing.truncated:
        lines.append(truncation(listing))
    return "\n".join(lines)


def kept(report: RetentionReport, now: float, store: StoreConfig) -> str:
    """What the store keeps beyond the queue, for `maildetour queue` (issue 12): finished
    messages (for `trace`), bytes kept for late bounces, late bounces, quarantined copies."""
    def after(seconds: float | None) -> str:
        return "kept for ever" if seconds is None else f"removed {age(seconds)} after"

    parts = [f"{_plural(report.finished, 'finished message')}"
             + (f" (oldest finished {age(now - report.oldest_finished)} ago; {after(store.retention)})"
                if report.oldest_finished is not None else "")]
    if report.kept_for_late_bounces:
        parts.append(f"{report.kept_for_late_bounces} with their bytes kept for late bounces"
                     + (f" until {_second(report.kept_until)}" if report.kept_until is not None else ""))
    parts.append(_plural(report.late_bounces, "late bounce"))
    parts.append(_plural(report.quarantined, "quarantined copy", "quarantined copies")
                 + (f" (the oldest waiting {age(now - report.oldest_quarantined)}; "
                    f"{after(store.quarantine_retention).replace('removed', 'deleted')})"
                    if report.oldest_quarantined is not None else ""))
    return "-- kept beyond the queue: " + ", ".join(parts) + "."


def truncation(listing: QueueListing) -> str:
    return f"... {len(listing.messages)} of {listing.matched_messages} messages shown; --limit to see more"


def queue_json(listing: QueueListing, now: float) -> list[str]:
    """Like `postqueue -j`: one JSON object per message (keys in docs/operations.md)."""
    return [json.dumps({
        "queue_id": lm.message.queue_id, "arrival_time": lm.message.received_at,
        "age": round(now - lm.message.received_at, 3), "message_size": lm.message.size,
        "sender": lm.message.mail_from, "message_id": lm.message.message_id, "client": lm.message.client,
        "copies": [_copy_json(c) for c in lm.copies],
    }) for lm in listing.messages]


def _copy_json(listed: ListedCopy) -> dict[str, object]:
    c, r = listed.copy, listed.last_reply
    return {"copy": c.id, "recipient": c.recipient, "target": c.target, "origin": c.origin, "hidden": c.hidden,
            "state": c.state, "attempts": c.attempts, "detours": c.detours,
            "next_attempt": c.next_at if c.state == "queued" else None,
            "in_flight_since": listed.in_flight_since,
            "last_reply": r.detail if r else None, "last_reply_kind": r.kind if r else None,
            "last_reply_time": r.at if r else None}


def message_show(story: Story, data: bytes | None, *, body: bool, now: float) -> str:
    """`queue show`: the envelope and every copy (with its last reply), then the message as
    stored — its header block, and with `body` the whole of it — after one empty line."""
    m = story.message
    replies: dict[int, Event] = {}
    for e in story.events:
        if e.copy_id is not None and e.kind in REPLY_KINDS:
            replies[e.copy_id] = e
    lines = [f"message {m.queue_id}  received {_second(m.received_at)} ({age(now - m.received_at)} ago)",
             f"  from <{m.mail_from}>  client {m.client}  size {m.size}",
             f"  Message-ID {m.message_id or '(none)'}", "copies:"]
    for c in story.copies:
        lines += _copy_lines(ListedCopy(c, replies.get(c.id), None))
    lines.append("")
    if data is None:
        lines.append("(the message's bytes are no longer kept: its copies are final)")
        return "\n".join(lines)
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    head, sep, rest = text.partition("\n\n")
    lines.append(head + sep + rest if body else head)
    return "\n".join(lines).rstrip("\n")

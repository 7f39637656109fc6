"""Text for operators: the routing table (`check`), one address (`route`), one message's
story (`trace`) and the queue (`queue`).

Pure: values in (from the config, the routing table and the store), text out. Operator-facing
only: it shows hidden addresses, because the operator configured them; nothing here is sent
to a sender.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Mapping, Sequence

from maildetour.config.model import Config, ImapAccount
from maildetour.core.destinations import IMAP_PREFIX, detour_chain, is_imap
from maildetour.core.routing import Accept, Route, RoutingTable
from maildetour.store.records import Copy, Story


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def describe_target(table: RoutingTable, target: str, imap: Mapping[str, ImapAccount]) -> str:
    """`ituki-ex@gmail.com (smtp, hidden, detour after 600s of 4xx) -> detour imap:gmail (...)`:
    every step of the target's detour chain, what it is, and when the copy moves on."""
    chain = detour_chain(table.destinations, target)
    hidden = False
    parts = []
    for i, step in enumerate(chain.steps):
        hidden = hidden or table.is_hidden(step.target)
        kind = {"local": "local mailbox", "smtp": "smtp", "imap": "imap"}[table.kind(step.target)]
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
    lines = [f"config {config.path}: OK", f"hostname  {config.server.hostname}",
             f"state dir {config.server.state_dir}",
             f"domains   {', '.join(sorted(table.domains)) or '(none)'}", "", "mailboxes:"]
    lines += [f"  {address}" for address in sorted(table.mailboxes)] or ["  (none)"]
    lines += ["", "forwards (first match wins: exact, mailbox, plus-address, catch-all):"]
    for rule in config.forwards:
        lines.append(f"  {rule.pattern}")
        lines += [f"    -> {describe_target(table, target, config.imap)}" for target in rule.to]
    if not config.forwards:
        lines.append("  (none)")
    lines += ["", "destinations:"]
    for address, dest in sorted(config.destinations.items()):
        lines.append(f"  {describe_target(table, address, config.imap)}")
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


def route_story(table: RoutingTable, found: Route, imap: Mapping[str, ImapAccount]) -> str:
    if isinstance(found, Accept):
        lines = [f"{found.recipient}: accepted ({found.why})"]
        lines += [f"  -> {describe_target(table, t, imap)}" for t in found.targets]
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


def queue(copies: Sequence[Copy]) -> str:
    if not copies:
        return "queue is empty"
    lines = [f"{'queue id':<17} {'copy':>6} {'state':<11} {'tries':>5}  {'next attempt':<25} target  (sender)"]
    for c in copies:
        nxt = _when(c.next_at) if c.state == "queued" else "-"
        lines.append(f"{c.queue_id:<17} {c.id:>6} {c.state:<11} {c.attempts:>5}  {nxt:<25} "
                     f"{c.target}  (<{c.mail_from}>)")
    return "\n".join(lines)

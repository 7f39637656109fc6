"""Where mail for an address goes, and why: the routing table built from the config.

Pure. Called for every RCPT (faces the internet through `inbound`) and by `maildetour route`.
Lookup order for a recipient at one of our domains; the first match wins:
  1. a forward rule for the exact address;
  2. a mailbox with that exact address;
  3. with plus-addressing removed (`user+tag@d` -> `user@d`): a forward rule, then a mailbox;
  4. the domain's catch-all forward rule (`"@d"`);
  otherwise the address is unknown (550 5.1.1). Addresses outside our domains are refused
  (554 5.7.1: not an open relay). Forward targets that are themselves forwarded by us are
  expanded (like Postfix virtual aliases), up to `MAX_EXPANSION` levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maildetour.core import replies
from maildetour.core.address import Address, base_address, parse_address
from maildetour.core.destinations import Destination, detour_chain, is_imap
from maildetour.core.replies import Reply

# Deeper chains of local forwards are a config mistake, not something to follow forever.
MAX_EXPANSION = 8

Kind = Literal["local", "smtp", "imap"]


@dataclass(frozen=True, slots=True)
class Accept:
    recipient: str  # the public address the sender used (lowercased)
    targets: tuple[str, ...]  # where copies go
    why: str


@dataclass(frozen=True, slots=True)
class Refuse:
    reply: Reply
    why: str


Route = Accept | Refuse


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Built from the config by `Config.routing_table()`."""

    domains: frozenset[str]
    mailboxes: frozenset[str]
    forwards: dict[str, tuple[str, ...]]  # exact address or "@domain" -> targets
    destinations: dict[str, Destination]

    def kind(self, target: str) -> Kind:
        """How a target is delivered: into one of our mailboxes, appended into an IMAP account
        (a detour step "imap:NAME"), or by SMTP."""
        if is_imap(target):
            return "imap"
        return "local" if target.lower() in self.mailboxes else "smtp"

    def is_hidden(self, target: str) -> bool:
        dest = self.destinations.get(target.lower())
        return dest is not None and dest.hidden

    def detour_chain(self, target: str) -> tuple[str, ...]:
        """target, its detour, that one's detour, ... (the config has no loops)."""
        return detour_chain(self.destinations, target).targets


def route(table: RoutingTable, address: Address) -> Route:
    if address.domain not in table.domains:
        return Refuse(replies.RELAY_DENIED, f"{address.domain} is not one of our domains")
    key = address.key
    base = base_address(address).key
    catch_all = "@" + address.domain
    if key in table.forwards:
        return _expanded(table, key, table.forwards[key], f"forward rule {key}")
    if key in table.mailboxes:
        return Accept(key, (key,), f"mailbox {key}")
    if base != key and base in table.forwards:
        return _expanded(table, key, table.forwards[base], f"forward rule {base} (plus-address)")
    if base != key and base in table.mailboxes:
        return Accept(key, (base,), f"mailbox {base} (plus-address)")
    if catch_all in table.forwards:
        return _expanded(table, key, table.forwards[catch_all], f"catch-all rule {catch_all}")
    return Refuse(replies.UNKNOWN_USER, f"no mailbox or forward rule for {key}")


def _expanded(table: RoutingTable, recipient: str, targets: tuple[str, ...], why: str) -> Route:
    """Expand targets that are our own forwarded addresses; keep order, drop duplicates."""
    result: list[str] = []

    def walk(items: tuple[str, ...], depth: int) -> bool:
        for target in items:
            inner = _local_forward(table, target)
            if inner is None:
                if target not in result:
                    result.append(target)
            elif depth >= MAX_EXPANSION or not walk(inner, depth + 1):
                return False
        return True

    if not walk(targets, 1):
        return Refuse(replies.INTERNAL_ERROR, f"forwarding of {recipient} nests too deep")
    return Accept(recipient, tuple(result), why)


def _local_forward(table: RoutingTable, target: str) -> tuple[str, ...] | None:
    """The targets of a forward rule at our domains for `target`, or None (deliver as is)."""
    parsed = parse_address(target)
    if not isinstance(parsed, Address) or parsed.domain not in table.domains:
        return None
    if parsed.key in table.mailboxes:
        return None
    found = route(table, parsed)
    return found.targets if isinstance(found, Accept) else None

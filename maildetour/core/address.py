"""Mail addresses: parse what a client sends in MAIL FROM / RCPT TO, and normalise it.

Pure. Faces the internet through `inbound`: every RCPT argument passes through `parse_address`.
Refuses the forms that make open relays (RFC 5321 source routes `@a:b@c`, `%` and `!` routing,
quoted local parts that hide an `@`, IP-literal domains, empty parts) instead of "helpfully"
interpreting them. Fails with an `AddressError` value, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5321 4.5.3.1: local part 64 octets, domain 255, path 256.
MAX_LOCAL = 64
MAX_DOMAIN = 255

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# dot-atom local part (RFC 5322 atext, plus UTF-8 for SMTPUTF8); no quoted strings.
_ATEXT = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+$")
SOURCE_ROUTE = "source routes are not accepted"  # an AddressError reason the SMTP side tells apart


@dataclass(frozen=True, slots=True)
class Address:
    local: str  # as given (case kept for delivery)
    domain: str  # lowercased, IDNA-decoded form kept as given but lowercased, no trailing dot

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Case-insensitive lookup key: the whole address lowercased."""
        return f"{self.local.lower()}@{self.domain}"


@dataclass(frozen=True, slots=True)
class AddressError:
    reason: str


def parse_address(text: str) -> Address | AddressError:
    """Parse `local@domain` (angle brackets already removed)."""
    if not text:
        return AddressError("empty address")
    if any(c in text for c in " \t\r\n\0\"\\<>,;()[]"):
        return AddressError("characters not allowed in an address")
    if text.startswith("@") or ":" in text:
        return AddressError(SOURCE_ROUTE)
    if text.count("@") != 1:
        return AddressError("an address has exactly one @")
    local, domain = text.split("@")
    if "%" in local or "!" in local:
        return AddressError("%-hack and bang paths are not accepted")
    if not local or len(local.encode()) > MAX_LOCAL:
        return AddressError("local part empty or too long")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return AddressError("local part has misplaced dots")
    if not all(_ATEXT.match(part) for part in local.split(".")):
        return AddressError("local part has characters not allowed")
    checked = check_domain(domain)
    if isinstance(checked, AddressError):
        return checked
    return Address(local, checked)


def check_domain(domain: str) -> str | AddressError:
    """Return the domain lowercased, or why it is not a plain DNS name."""
    if domain.endswith("."):
        return AddressError("trailing dot in domain")
    domain = domain.lower()
    if not domain or len(domain) > MAX_DOMAIN:
        return AddressError("domain empty or too long")
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return AddressError("domain is not a valid name")
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return AddressError("domain is not a valid name")
    if labels[-1].isdigit():
        return AddressError("IP addresses are not accepted as domains")
    return domain


def base_address(address: Address) -> Address:
    """`user+tag@d` -> `user@d` (plus-addressing)."""
    local, plus, _tag = address.local.partition("+")
    if plus and local:
        return Address(local, address.domain)
    return address


def raw_path_problem(argument: str) -> AddressError | None:
    """What is wrong with the path of a MAIL FROM/RCPT TO argument as the client wrote it
    (after `FROM:`/`TO:`), before any parser unquotes it or strips its comments and route.

    aiosmtpd's parser (the e-mail header parser) turns `<(c)@relay.example:u@d>` into `u@d`
    and `<"u"@d>` into `u@d`, so `parse_address` alone never sees them. Refused here: quoted
    strings, comments, backslash escapes and source routes inside the path (a ':' outside an
    address literal). Whatever follows the path (ESMTP parameters) is not looked at.
    """
    text = argument.lstrip()
    if text.startswith("<"):
        end = text.find(">")
        path = text[1:end] if end >= 0 else text[1:]
    else:
        path = text.split(None, 1)[0] if text else ""
    if any(c in path for c in '"()\\'):
        return AddressError("quoted strings and comments are not accepted")
    if path.startswith("@") or ":" in path.split("[", 1)[0]:
        return AddressError(SOURCE_ROUTE)
    return None

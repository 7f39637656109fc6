"""Every SMTP reply maildetour sends, by name, with its enhanced status code (RFC 3463).

Pure. Faces the internet: these texts go to clients. None of them carries an address or an
exception's text, so nothing private can leak through a reply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # starts with the enhanced status code

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


SENDER_OK = Reply(250, "2.1.0 Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5 Recipient OK")
UNKNOWN_USER = Reply(550, "5.1.1 Recipient address rejected: user unknown")
RELAY_DENIED = Reply(554, "5.7.1 Relay access denied")
BAD_RECIPIENT = Reply(553, "5.1.3 Recipient address not accepted")
BAD_SENDER = Reply(553, "5.1.7 Sender address not accepted")
SOURCE_ROUTE = Reply(553, "5.1.3 Source routes are not accepted")
# Quoted local parts, comments and backslash escapes: aiosmtpd would strip or unquote them
# before our parser saw the address, so they are refused on the raw argument (docs/quirks.md).
ADDRESS_FORM = Reply(553, "5.1.3 Quoted strings and comments in addresses are not accepted")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Too many recipients")
# Bounces to our SRS addresses and ordinary mail go in separate transactions (452: the client
# sends the rest again in a new one, RFC 5321 3.3).
SEPARATE_BOUNCES = Reply(452, "4.5.3 Send bounces and other mail in separate transactions")
BARE_CR_LF = Reply(550, "5.5.2 Message has bare CR or LF characters; use CRLF line endings")
TOO_BIG = Reply(552, "5.3.4 Message size exceeds the fixed limit")
LINE_TOO_LONG = Reply(500, "5.5.2 Line too long")
INTERNAL_ERROR = Reply(451, "4.3.0 Internal error, please try again later")
TOO_MANY_SESSIONS = Reply(421, "4.7.0 Too many connections, please try again later")
# The store could not write (disk full: ENOSPC, EDQUOT, SQLITE_FULL): nothing was accepted.
NO_STORAGE = Reply(452, "4.3.1 Insufficient system storage, please try again later")
# DATA slower than `[smtp] min_data_rate` (Postfix's smtpd_min_data_rate): the connection closes.
DATA_TOO_SLOW = Reply(421, "4.4.2 Data too slow, closing connection")
# A command line that ends in a bare LF or holds a bare CR: the client and we might disagree
# on where a command ends, so we answer like Postfix's smtpd_forbid_bare_newline and hang up.
BARE_LF_COMMAND = Reply(521, "5.5.2 Bare CR or LF in a command line; use CRLF. Closing connection")

# Per-client limits (inbound.limits). 421 closes the connection; 450 refuses one command.
CLIENT_SESSIONS = Reply(421, "4.7.0 Too many connections from your address, please try again later")
CLIENT_CONNECTION_RATE = Reply(421, "4.7.0 Too many connections from your address per minute, "
                                    "please try again later")
NO_PROGRESS = Reply(421, "4.7.0 Too many commands without progress, closing connection")
SESSION_TIME = Reply(421, "4.7.0 Session time limit reached, closing connection")
SESSION_REFUSED = Reply(421, "4.7.0 Too many refused recipients, closing connection")
CLIENT_REFUSED = Reply(450, "4.7.1 Too many refused recipients from your address, try again later")
CLIENT_MESSAGE_RATE = Reply(450, "4.7.1 Too much mail from your address, try again later")
CLIENT_RECIPIENT_RATE = Reply(450, "4.7.1 Too many recipients from your address, try again later")
DOMAIN_MESSAGE_RATE = Reply(450, "4.7.1 Too much mail from this sender domain, try again later")
DOMAIN_RECIPIENT_RATE = Reply(450, "4.7.1 Too many recipients from this sender domain, try again later")


def queued(queue_id: str) -> Reply:
    return Reply(250, f"2.0.0 OK: queued as {queue_id}")


# aiosmtpd's own replies lack enhanced status codes (and some say "Error:"): translated at the
# wire boundary (`inbound.server`). Keyed by the library's exact text, or its prefix.
LIBRARY_REPLIES: dict[str, str] = {
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "552 Error: Too much mail data": str(TOO_BIG),
    "552 Error: message size exceeds fixed maximum message size": str(TOO_BIG),
    "500 Line too long (see RFC5321 4.5.3.1.6)": str(LINE_TOO_LONG),
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "500 Error: strict ASCII mode": "500 5.5.2 Non-ASCII data without SMTPUTF8",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command first",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command first",
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command",
    "503 Error: send HELO first": "503 5.5.1 Send EHLO/HELO first",
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "553 5.1.3 Error: malformed address": "553 5.1.3 Malformed address",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    ),
    "555 MAIL FROM parameters not recognized or not implemented": (
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
    ),
    "555 RCPT TO parameters not recognized or not implemented": (
        "555 5.5.4 RCPT TO parameters not recognized or not implemented"
    ),
}

# Fallback enhanced codes by reply class, for library replies not listed above.
DEFAULT_ENHANCED = {"2": "2.0.0", "4": "4.0.0", "5": "5.5.2"}

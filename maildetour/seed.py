"""The seed's setup (DESIGN.md): one config text, and the one way to adapt it.

Pure apart from reading `seed.toml` (package data). `maildetour demo`, the tests and the
benchmark all start from this file, so the setup they run is the one the README shows.
`adapt` changes the few values a run needs to change (ports, the relay of gmail.com, the
detour delay), adds keys to `[delivery]` and tables at the end, or drops `[pop3]`; a value it
is asked to change must be there, so a changed seed file cannot go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

SEED_FILE = Path(__file__).with_name("seed.toml")

# The values of the seed that runs adapt, as they stand in the file.
SMTP_LISTEN = '"127.0.0.1:2525"'
POP3_TABLE = '[pop3]\nlisten = ["127.0.0.1:1100"]\n'
RELAY = 'relay = { "gmail.com" = "127.0.0.2:2525" }\n'
DETOUR_AFTER = 'detour_after = "10m"'
DETOUR = 'detour       = "ituki@gm.example.net"'


def seed_text() -> str:
    return SEED_FILE.read_text(encoding="utf-8")


def adapt(text: str, *, smtp: str | None = None, pop3: str | None = "127.0.0.1:1100",
          relay: str | None = None, delivery_extra: str = "", detour_after: str | None = None,
          detour: str | None = None, extra: str = "") -> str:
    """The seed with SMTP on `smtp`, POP3 on `pop3` (None: no POP3), `relay` as the inner
    text of `[delivery] relay = { ... }`, `delivery_extra` lines in `[delivery]`, the hidden
    destination's `detour` value (TOML, e.g. '["imap:gmail", "ituki@gm.example.net"]'), and
    `extra` (whole tables) at the end."""
    def swap(old: str, new: str) -> None:
        nonlocal text
        if old not in text:
            raise ValueError(f"the seed config has no {old.strip()!r} to adapt")
        text = text.replace(old, new, 1)

    if smtp is not None:
        swap(SMTP_LISTEN, f'"{smtp}"')
    if pop3 is None:
        swap(POP3_TABLE, "")
    elif pop3 != "127.0.0.1:1100":
        swap(POP3_TABLE, f'[pop3]\nlisten = ["{pop3}"]\n')
    if relay is not None or delivery_extra:
        line = RELAY if relay is None else f"relay = {{ {relay} }}\n"
        swap(RELAY, line + (delivery_extra.rstrip("\n") + "\n" if delivery_extra else ""))
    if detour is not None:
        swap(DETOUR, f"detour       = {detour}")
    if detour_after is not None:
        swap(DETOUR_AFTER, f'detour_after = "{detour_after}"')
    return text + extra

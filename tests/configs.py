"""Config texts shared by tests: the seed example of DESIGN.md, adaptable per test."""

from __future__ import annotations

from pathlib import Path

from maildetour.config import Config, load_config

def seed(*, smtp: str = "127.0.0.1:2525", pop3: str | None = "127.0.0.1:1100",
         relay: str = '"gmail.com" = "127.0.0.2:2525"', delivery_extra: str = "",
         detour_after: str = "10m", extra: str = "") -> str:
    """The DESIGN.md seed example; the defaults give it exactly, the arguments adapt it."""
    pop3_table = f'[pop3]\nlisten = ["{pop3}"]\n' if pop3 else ""
    return f"""\
[server]
hostname  = "mx.example.com"
state_dir = "var"

[smtp]
listen  = ["{smtp}"]
domains = ["example.com"]
max_message_size = "25MB"

{pop3_table}
[delivery]
relay = {{ {relay} }}
{delivery_extra}

[mailbox."ituki@pc.example.net"]
password = "change-me"

[mailbox."ituki@gm.example.net"]
password = "change-me-too"

[forward."ituki@example.com"]
to = ["ituki@pc.example.net", "ituki-ex@gmail.com"]

[destination."ituki-ex@gmail.com"]
hidden       = true
detour       = "ituki@gm.example.net"
detour_after = "{detour_after}"
{extra}"""


SEED = seed()


def write_config(directory: Path, text: str = SEED, name: str = "maildetour.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def seed_config(directory: Path, text: str = SEED) -> Config:
    return load_config(write_config(directory, text))

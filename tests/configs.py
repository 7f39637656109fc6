"""Config texts shared by tests: the seed example of DESIGN.md, adaptable per test."""

from __future__ import annotations

from pathlib import Path

from maildetour.config import Config, load_config

SEED = """\
[server]
hostname  = "mx.example.com"
state_dir = "var"

[smtp]
listen  = ["127.0.0.1:2525"]
domains = ["example.com"]
max_message_size = "25MB"

[pop3]
listen = ["127.0.0.1:1100"]

[delivery]
relay = { "gmail.com" = "127.0.0.2:2525" }

[mailbox."ituki@pc.example.net"]
password = "change-me"

[mailbox."ituki@gm.example.net"]
password = "change-me-too"

[forward."ituki@example.com"]
to = ["ituki@pc.example.net", "ituki-ex@gmail.com"]

[destination."ituki-ex@gmail.com"]
hidden       = true
detour       = "ituki@gm.example.net"
detour_after = "10m"
"""


def write_config(directory: Path, text: str = SEED, name: str = "maildetour.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def seed_config(directory: Path, text: str = SEED) -> Config:
    return load_config(write_config(directory, text))

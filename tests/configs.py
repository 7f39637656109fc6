"""Config texts shared by tests: the seed example of DESIGN.md (`maildetour/seed.toml`), adaptable per test."""

from __future__ import annotations

from pathlib import Path

from maildetour.config import Config, load_config
from maildetour.seed import adapt, seed_text

def seed(*, smtp: str = "127.0.0.1:2525", pop3: str | None = "127.0.0.1:1100",
         relay: str = '"gmail.com" = "127.0.0.2:2525"', delivery_extra: str = "",
         detour_after: str = "10m", detour: str | None = None, extra: str = "") -> str:
    """The DESIGN.md seed example (`maildetour/seed.toml`); the defaults give it exactly, the
    arguments adapt it."""
    return adapt(seed_text(), smtp=smtp, pop3=pop3, relay=relay, delivery_extra=delivery_extra,
                 detour_after=detour_after, detour=detour, extra=extra)


SEED = seed()


def write_config(directory: Path, text: str = SEED, name: str = "maildetour.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def seed_config(directory: Path, text: str = SEED) -> Config:
    return load_config(write_config(directory, text))

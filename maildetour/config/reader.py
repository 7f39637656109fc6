"""Reading TOML values: the table reader that rejects unknown keys, and the value parsers.

Pure. Every error is a `ConfigError` naming the dotted key as written in TOML.
"""

from __future__ import annotations

import re
from typing import Any, Callable, TypeVar

from maildetour.core.address import AddressError, parse_address
from maildetour.core.hostport import HostPort

T = TypeVar("T")


class ConfigError(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.I)
_SIZE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(key: str, value: object) -> int:
    """`25MB`, `512KB`, `1048576`: KB/MB/GB are powers of 1024 (as in Postfix' docs)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        number, unit = int(m.group(1)), (m.group(2) or "b").lower()[0]
        if number > 0:
            return number * _SIZE_UNITS[unit]
    raise ConfigError(key, f"expected a size like \"25MB\", got {value!r}")


def parse_duration(key: str, value: object) -> float:
    """`10m`, `30s`, `2h`, `5d`, `250ms`, or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ConfigError(key, f"expected a duration like \"10m\", got {value!r}")


def parse_hostport(key: str, value: object) -> HostPort:
    """`127.0.0.1:2525`, `[::1]:2525`, `mx.example.net:25`."""
    if isinstance(value, str):
        m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", value) or re.match(r"^([^\s:\[\]]+):(\d+)$", value)
        if m and 0 < int(m.group(2)) < 65536:
            return HostPort(m.group(1), int(m.group(2)))
    raise ConfigError(key, f"expected \"host:port\", got {value!r}")


def address_key(key: str, value: object) -> str:
    """A configured address, checked and lowercased (the routing key)."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected an address string, got {value!r}")
    parsed = parse_address(value)
    if isinstance(parsed, AddressError):
        raise ConfigError(key, f"{value!r} is not a usable address ({parsed.reason})")
    return parsed.key


class Table:
    """One TOML table being read: tracks which keys were used, rejects the rest."""

    def __init__(self, key: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigError(key, "expected a table")
        self.key, self.data, self.used = key, data, set[str]()

    def name(self, sub: str) -> str:
        """The dotted key as written in TOML: `forward."a@b.c".to`."""
        part = sub if re.fullmatch(r"[A-Za-z0-9_-]+", sub) else f'"{sub}"'
        return f"{self.key}.{part}" if self.key else part

    def get(self, sub: str, kind: type[T] | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(sub)
        if sub not in self.data:
            return default
        value = self.data[sub]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(self.name(sub), f"expected {names}, got {value!r}")
        return value

    def convert(self, sub: str, func: Callable[[str, object], T], default: T) -> T:
        self.used.add(sub)
        return func(self.name(sub), self.data[sub]) if sub in self.data else default

    def strings(self, sub: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(sub, list, None)
        if value is None:
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.name(sub)}[{i}]", f"expected a string, got {item!r}")
        return tuple(value)

    def sub_table(self, sub: str) -> "Table":
        self.used.add(sub)
        return Table(self.name(sub), self.data.get(sub, {}))

    def finish(self) -> None:
        for extra in sorted(set(self.data) - self.used):
            raise ConfigError(self.name(extra), "unknown key")

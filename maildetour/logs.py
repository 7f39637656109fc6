"""The server log: one line per event worth a line, as key=value (logfmt) or JSON lines.

What it does: `setup(level, fmt)` sends every log record to stderr (journald takes it from
there) through `LineFormatter`: "plain" writes `time level logger: message key=value ...`
(values quoted when they hold spaces or quotes), "json" one JSON object per line with the same
keys. Code that logs a fact with fields passes them as `extra={"fields": {...}}`; every other
record is its message alone. Exposure: operator-facing: lines may name hidden addresses (the
operator configured them); nothing here reaches a sender.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Literal

LogFormat = Literal["plain", "json"]


def setup(level: int = logging.INFO, fmt: LogFormat = "plain", process: str | None = None) -> None:
    """`process`: which process the lines come from, when it is not the main one (an SMTP
    intake worker: "intake1"), shown after the logger's name ("maildetour.inbound[intake1]")."""
    # What `LineFormatter` never shows, each record need not gather (the logging docs'
    # "Optimization"): the caller's frame, thread, process and multiprocessing names.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(fmt, process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter


class LineFormatter(logging.Formatter):
    def __init__(self, fmt: LogFormat = "plain", process: str | None = None) -> None:
        super().__init__()
        self.fmt, self.process = fmt, process

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        when = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        name = record.name if self.process is None else f"{record.name}[{self.process}]"
        if self.fmt == "json":
            return json.dumps({"time": when, "level": record.levelname.lower(), "logger": name,
                               "msg": message, **fields}, ensure_ascii=False, default=str)
        pairs = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
        return f"{when} {record.levelname} {name}: {message}" + (f" {pairs}" if pairs else "")


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text

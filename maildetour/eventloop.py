"""Which event loop runs the server: uvloop when it can, asyncio's own otherwise.

What: `choose(wanted)` turns `[server] event_loop` ("auto", "uvloop", "asyncio"), or the
environment's `MAILDETOUR_EVENT_LOOP` when set (the operator's override, e.g. to rule the loop
out while chasing a problem), into a loop factory and its name; `run(coroutine, wanted)` runs a
coroutine to its end on that loop (`asyncio.Runner`, as `asyncio.run` does). "auto" is uvloop
when it imports (a dependency, so normally yes), else asyncio's loop; "uvloop" insists and
fails when it is missing. Both loops serve every part of maildetour: the SMTP and POP3 servers
(`start_tls`, `set_protocol`, `sni_callback`), signal handlers, subprocesses, threads.

Contract: the choice is made once per process, at start; a reload does not change it.
Exposure: internal. Failure: ConfigError naming `server.event_loop` (or the environment
variable) for an unknown name or a missing uvloop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from maildetour.config import ConfigError
from maildetour.config.model import EVENT_LOOPS

T = TypeVar("T")
ENVIRONMENT = "MAILDETOUR_EVENT_LOOP"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def choose(wanted: str) -> tuple[str, LoopFactory]:
    """The loop to run (its name: "uvloop" or "asyncio") and a factory for it."""
    key = "server.event_loop"
    if os.environ.get(ENVIRONMENT):
        key, wanted = ENVIRONMENT, os.environ[ENVIRONMENT]
    if wanted not in EVENT_LOOPS:
        raise ConfigError(key, f"expected one of {', '.join(EVENT_LOOPS)}, got {wanted!r}")
    if wanted != "asyncio":
        try:
            import uvloop
        except ImportError:
            if wanted == "uvloop":
                raise ConfigError(key, "uvloop is not installed (pip install uvloop)") from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(coroutine: Coroutine[Any, Any, T], wanted: str) -> T:
    """Run `coroutine` on the chosen loop until it ends (raises what `choose` raises, having
    closed the coroutine)."""
    try:
        _, factory = choose(wanted)
    except ConfigError:
        coroutine.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


def running_name() -> str:
    """The name of the loop running now ("uvloop" or "asyncio"), for the log."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"

"""`[server] event_loop` (issue 13, "a faster loop"): uvloop when it imports, asyncio's own loop
otherwise, and a clear one-line error when uvloop is asked for by name but missing."""

from __future__ import annotations

import asyncio
import builtins
import os
import subprocess
import sys
from typing import Any

import pytest

from maildetour import eventloop
from maildetour.config import ConfigError, load_config
from tests.configs import SEED, write_config


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENVIRONMENT, raising=False)


@pytest.fixture
def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import uvloop` fails, as on a system without it."""
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop" or name.startswith("uvloop."):
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "uvloop", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


async def loop_name() -> str:
    await asyncio.sleep(0)
    return eventloop.running_name()


def test_asyncio_when_asked() -> None:
    name, _ = eventloop.choose("asyncio")
    assert name == "asyncio"
    assert eventloop.run(loop_name(), "asyncio") == "asyncio"


def test_auto_is_uvloop_when_it_imports() -> None:
    pytest.importorskip("uvloop", reason="uvloop is not installed here (pip install uvloop)")
    assert eventloop.choose("auto")[0] == "uvloop"
    assert eventloop.run(loop_name(), "auto") == "uvloop"
    assert eventloop.run(loop_name(), "uvloop") == "uvloop"


def test_auto_falls_back_to_asyncio_without_uvloop(without_uvloop: None) -> None:
    assert eventloop.choose("auto")[0] == "asyncio"
    assert eventloop.run(loop_name(), "auto") == "asyncio"


def test_uvloop_named_but_missing_is_a_config_error(without_uvloop: None) -> None:
    coroutine = loop_name()
    with pytest.raises(ConfigError) as caught:
        eventloop.run(coroutine, "uvloop")
    assert caught.value.key == "server.event_loop"
    assert "uvloop is not installed" in str(caught.value)
    assert coroutine.cr_frame is None  # closed, not left to warn "never awaited"


def test_environment_overrides_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENVIRONMENT, "asyncio")
    assert eventloop.choose("uvloop")[0] == "asyncio"
    monkeypatch.setenv(eventloop.ENVIRONMENT, "tornado")
    with pytest.raises(ConfigError) as caught:
        eventloop.choose("auto")
    assert caught.value.key == eventloop.ENVIRONMENT


def test_unknown_name_in_config_is_refused(tmp_path: Any) -> None:
    path = write_config(tmp_path, SEED.replace('state_dir = "var"', 'state_dir = "var"\nevent_loop = "fast"'))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "server.event_loop"


def test_serve_with_missing_uvloop_says_one_line(tmp_path: Any) -> None:
    """`maildetour serve` with `event_loop = "uvloop"` where uvloop cannot be imported: exit 1,
    one line naming the key, and nothing started (no pid file)."""
    config = write_config(tmp_path, SEED.replace('state_dir = "var"', 'state_dir = "var"\nevent_loop = "uvloop"')
                          .replace("127.0.0.1:2525", "127.0.0.1:9").replace("127.0.0.1:1100", "127.0.0.1:9"))
    # A `uvloop` package that fails to import, first on the path.
    fake = tmp_path / "nouvloop" / "uvloop"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('uvloop is broken here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    env.pop(eventloop.ENVIRONMENT, None)
    done = subprocess.run([sys.executable, "-m", "maildetour.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "server.event_loop" in lines[0] and "uvloop is not installed" in lines[0]
    assert not (tmp_path / "var" / "maildetour.pid").exists()

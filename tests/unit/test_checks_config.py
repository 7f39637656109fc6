"""`[checks]`: the per-message deadline of the inbound checks (issue 10 #6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildetour.config import ConfigError, load_config
from tests.configs import SEED, write_config


def test_checks_timeout_is_one_deadline_and_must_be_positive(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, SEED + '\n[checks]\ninbound = true\ntimeout = "2s"\n'))
    assert config.checks.inbound and config.checks.timeout == 2.0
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, SEED + '\n[checks]\ntimeout = "0s"\n'))
    assert caught.value.key == "checks.timeout"

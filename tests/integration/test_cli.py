"""The command line: exit codes, one-line errors naming the key, check/route/trace/passwd."""

import subprocess
import sys
from pathlib import Path

from maildetour.core.password import verify_password
from tests.configs import SEED, write_config


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maildetour.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=30)


def test_check_prints_the_routing_table_with_hidden_destinations_and_detour_chains(tmp_path: Path) -> None:
    result = cli("check", "--config", str(write_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "ituki-ex@gmail.com (smtp, hidden, detour after 600s of 4xx) -> detour ituki@gm.example.net" in result.stdout
    assert "ituki@pc.example.net (local mailbox)" in result.stdout


def test_a_config_error_is_one_line_naming_the_key_and_exit_1(tmp_path: Path) -> None:
    path = write_config(tmp_path, SEED.replace("hidden       = true", "hiden = true"))
    result = cli("check", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'maildetour: config error: destination."ituki-ex@gmail.com".hiden: unknown key']


def test_a_missing_config_file_is_exit_1_and_bad_usage_exit_2(tmp_path: Path) -> None:
    assert cli("check", "--config", str(tmp_path / "nope.toml")).returncode == 1
    assert cli("frobnicate").returncode == 2
    assert cli("check").returncode == 2


def test_route_explains_where_mail_goes(tmp_path: Path) -> None:
    path = str(write_config(tmp_path))
    accepted = cli("route", "--config", path, "Ituki+news@example.com")
    assert accepted.returncode == 0
    assert "accepted (forward rule ituki@example.com (plus-address))" in accepted.stdout
    refused = cli("route", "--config", path, "nobody@example.com")
    assert "550 5.1.1" in refused.stdout
    assert cli("route", "--config", path, "not an address").returncode == 1


def test_trace_of_an_unknown_message_is_exit_1(tmp_path: Path) -> None:
    path = str(write_config(tmp_path))
    assert cli("trace", "--config", path, "NOSUCHID").returncode == 1  # no queue yet


def test_passwd_prints_a_scrypt_hash_that_verifies(tmp_path: Path) -> None:
    result = cli("passwd", stdin="s3cret\n")
    assert result.returncode == 0
    encoded = result.stdout.strip()
    assert encoded.startswith("scrypt$") and verify_password(encoded, "s3cret")
    assert not verify_password(encoded, "other")


def test_serve_on_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, f'[smtp]\nlisten = ["127.0.0.1:{port}"]\ndomains = ["example.com"]\n')
        result = cli("serve", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"maildetour: config error: smtp.listen: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr

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


def test_route_explains_where_mail_goes_and_exits_1_for_an_address_it_refuses(tmp_path: Path) -> None:
    path = str(write_config(tmp_path))
    accepted = cli("route", "--config", path, "Ituki+news@example.com")
    assert accepted.returncode == 0
    assert "accepted (forward rule ituki@example.com (plus-address))" in accepted.stdout
    refused = cli("route", "--config", path, "nobody@example.com")  # issue 12: a refusal is not success
    assert refused.returncode == 1 and "550 5.1.1" in refused.stdout
    relay = cli("route", "--config", path, "someone@elsewhere.example")
    assert relay.returncode == 1 and "554 5.7.1" in relay.stdout
    assert cli("route", "--config", path, "not an address").returncode == 1


def test_trace_errors_are_one_prefixed_line_on_stderr(tmp_path: Path) -> None:
    path = str(write_config(tmp_path))
    unknown = cli("trace", "--config", path, "NOSUCHID")  # no queue yet
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr == "maildetour: no message with queue id or Message-ID 'NOSUCHID'\n"
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "queue.sqlite3").write_text("not a database")  # issue 12: no traceback
    damaged = cli("trace", "--config", path, "NOSUCHID")
    assert damaged.returncode == 1 and damaged.stdout == ""
    assert damaged.stderr.startswith("maildetour: ") and "cannot read the queue" in damaged.stderr
    assert len(damaged.stderr.splitlines()) == 1


def test_passwd_prints_a_hash_dovecot_reads_too_that_verifies(tmp_path: Path) -> None:
    result = cli("passwd", stdin="s3cret\n")
    assert result.returncode == 0
    encoded = result.stdout.strip()
    assert encoded.startswith("{ARGON2ID}$argon2id$") and verify_password(encoded, "s3cret")
    assert not verify_password(encoded, "other")


def test_dkim_keygen_refuses_bad_bits_in_one_line(tmp_path: Path) -> None:
    path = str(write_config(tmp_path, SEED + '\n[signing]\ndomain = "example.com"\nselector = "md1"\n'
                                           'dkim_key = "dkim.key"\n'))
    for bits in ("512", "8192"):
        result = cli("dkim", "keygen", "--config", path, "--bits", bits)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr == (f"maildetour: --bits {bits}: DKIM RSA keys are 1024 to 4096 bits (RFC 8301: "
                                 "verifiers refuse shorter ones and need not take longer ones)\n")
    assert not (tmp_path / "dkim.key").exists()


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

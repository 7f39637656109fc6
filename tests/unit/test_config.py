"""Config: the seed example loads as is; mistakes are errors that name the key."""

from pathlib import Path

import pytest

from maildetour.config import ConfigError, load_config
from maildetour.config.load import parse_duration, parse_size
from maildetour.core.hostport import HostPort
from tests.configs import SEED, seed_config, write_config


def test_the_seed_example_of_design_md_loads_as_is(tmp_path: Path) -> None:
    config = seed_config(tmp_path)
    assert config.server.hostname == "mx.example.com"
    assert config.server.state_dir == (tmp_path / "var").resolve()
    assert config.smtp.listen == (HostPort("127.0.0.1", 2525),)
    assert config.smtp.max_message_size == 25 * 1024 * 1024
    assert config.delivery.relay == {"gmail.com": HostPort("127.0.0.2", 2525)}
    assert set(config.mailboxes) == {"ituki@pc.example.net", "ituki@gm.example.net"}
    assert config.forwards[0].to == ("ituki@pc.example.net", "ituki-ex@gmail.com")
    dest = config.destinations["ituki-ex@gmail.com"]
    assert dest.hidden and dest.detour == ("ituki@gm.example.net",) and dest.detour_after == 600.0
    # SRS is on without any [srs] or [signing]: at our domain, with a secret made at first start.
    assert config.srs is not None and config.srs.domain == "example.com" and config.srs.made_here
    assert config.srs.secret_file == config.server.state_dir / "srs.secret"


def error_for(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, text))
    return caught.value


def test_a_typo_in_a_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    err = error_for(tmp_path, SEED.replace("detour       =", "detuor       ="))
    assert err.key == 'destination."ituki-ex@gmail.com".detuor'
    assert "unknown key" in str(err)


def test_an_unknown_table_is_an_error(tmp_path: Path) -> None:
    assert error_for(tmp_path, SEED + "\n[smpt]\nlisten = []\n").key == "smpt"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (('max_message_size = "25MB"', 'max_message_size = "lots"'), "smtp.max_message_size"),
        (('max_message_size = "25MB"', 'max_message_size = "25MB"\nmin_data_rate = -1'), "smtp.min_data_rate"),
        (('detour_after = "10m"', 'detour_after = "soon"'), 'destination."ituki-ex@gmail.com".detour_after'),
        (('listen  = ["127.0.0.1:2525"]', 'listen  = ["127.0.0.1"]'), "smtp.listen[0]"),
        (('"gmail.com" = "127.0.0.2:2525"', '"gmail.com" = 25'), 'delivery.relay."gmail.com"'),
        (('hidden       = true', 'hidden       = "yes"'), 'destination."ituki-ex@gmail.com".hidden'),
        (('to = ["ituki@pc.example.net", "ituki-ex@gmail.com"]', 'to = []'), 'forward."ituki@example.com".to'),
        (('to = ["ituki@pc.example.net", "ituki-ex@gmail.com"]', 'to = ["not an address"]'),
         'forward."ituki@example.com".to[0]'),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, change: tuple[str, str], key: str) -> None:
    assert change[0] in SEED
    assert error_for(tmp_path, SEED.replace(*change)).key == key


def test_a_forward_for_a_domain_we_do_not_serve_is_an_error(tmp_path: Path) -> None:
    err = error_for(tmp_path, SEED + '\n[forward."x@elsewhere.org"]\nto = ["ituki@pc.example.net"]\n')
    assert err.key == 'forward."x@elsewhere.org"'


def test_a_detour_chain_that_loops_is_an_error(tmp_path: Path) -> None:
    text = SEED + '\n[destination."ituki@gm.example.net"]\ndetour = "ituki-ex@gmail.com"\n'
    err = error_for(tmp_path, text)
    assert "loops" in err.reason
    assert "ituki-ex@gmail.com -> ituki@gm.example.net -> ituki-ex@gmail.com" in err.reason


IMAP = """
[imap."gmail"]
host = "imap.gmail.com"
user = "ituki-ex@gmail.com"
password_command = "pass show gmail-app-password"
"""


def test_a_detour_is_a_list_of_steps_with_imap_accounts(tmp_path: Path) -> None:
    text = SEED.replace('detour       = "ituki@gm.example.net"',
                        'detour       = ["imap:gmail", "ituki@gm.example.net"]') + IMAP
    config = seed_config(tmp_path, text)
    assert config.destinations["ituki-ex@gmail.com"].detour == ("imap:gmail", "ituki@gm.example.net")
    account = config.imap["gmail"]
    assert (account.host, account.port, account.tls, account.folder, account.auth) == (
        "imap.gmail.com", 993, "implicit", "INBOX", "password")
    assert account.password_command == "pass show gmail-app-password" and account.password_file is None


def test_starttls_defaults_to_port_143(tmp_path: Path) -> None:
    text = SEED + IMAP.replace('user =', 'tls = "starttls"\nuser =')
    assert seed_config(tmp_path, text).imap["gmail"].port == 143


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (SEED.replace('detour       = "ituki@gm.example.net"', 'detour       = ["imap:nope"]'),
         'destination."ituki-ex@gmail.com".detour', "names no [imap"),
        (SEED.replace('detour       = "ituki@gm.example.net"', 'detour = ["ituki@gm.example.net", "nobody@example.com"]'),
         'destination."ituki-ex@gmail.com".detour[1]', "neither a mailbox nor forwarded"),
        (SEED.replace('detour       = "ituki@gm.example.net"', 'detour = ["ituki@gm.example.net", "ituki@gm.example.net"]'),
         'destination."ituki-ex@gmail.com".detour[1]', "already a step"),
        (SEED + IMAP.replace('password_command = "pass show gmail-app-password"', ""),
         'imap.gmail.password_file', "exactly one of"),
        (SEED + IMAP + 'password_file = "pw"\n', 'imap.gmail.password_command', "exactly one of"),
        (SEED + IMAP.replace('host = "imap.gmail.com"\n', ""), 'imap.gmail.host', "required"),
        (SEED + IMAP + 'auth = "xoauth2"\n', 'imap.gmail.token_command', "exactly one of"),
        (SEED + IMAP + 'tls = "none"\n', 'imap.gmail.tls', "implicit"),
        (SEED + "\n[srs]\ndomain = \"elsewhere.org\"\n", "srs.domain", "must be one of smtp.domains"),
    ],
    ids=["unknown imap account", "detour at our domain leads nowhere", "step twice", "no password",
         "two passwords", "no host", "xoauth2 without token command", "tls none", "srs domain not ours"],
)
def test_bad_detours_imap_accounts_and_srs_name_their_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    err = error_for(tmp_path, text)
    assert err.key == key and words in err.reason


def test_srs_takes_its_own_table_or_the_secret_of_signing(tmp_path: Path) -> None:
    own = seed_config(tmp_path, SEED + '\n[srs]\ndomain = "example.com"\nsecret_file = "my.secret"\n').srs
    assert own is not None and own.secret_file == (tmp_path / "my.secret").resolve() and not own.made_here
    signing = SEED + ('\n[signing]\ndomain = "example.com"\nselector = "s"\ndkim_key = "k.pem"\n'
                      'srs_secret_file = "old.secret"\n')
    kept = seed_config(tmp_path, signing).srs
    assert kept is not None and kept.secret_file == (tmp_path / "old.secret").resolve() and not kept.made_here
    both = signing + '\n[srs]\nsecret_file = "other.secret"\n'
    assert error_for(tmp_path, both).key == "srs.secret_file"


def test_password_and_hash_together_are_an_error(tmp_path: Path) -> None:
    text = SEED.replace('password = "change-me"', 'password = "a"\npassword_hash = "scrypt$x"\n#', 1)
    assert "not both" in error_for(tmp_path, text).reason


def test_not_toml_is_an_error(tmp_path: Path) -> None:
    assert "not valid TOML" in error_for(tmp_path, "[server\n").reason


def test_an_empty_file_gives_embedded_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""))
    assert config.smtp.listen == (HostPort("127.0.0.1", 2525),)
    assert config.smtp.max_received == 50 and config.smtp.max_sessions == 100


def test_sizes_and_durations() -> None:
    assert parse_size("k", "512KB") == 512 * 1024
    assert parse_size("k", 1000) == 1000
    assert parse_duration("k", "10m") == 600.0
    assert parse_duration("k", "250ms") == 0.25
    assert parse_duration("k", 3) == 3.0
    with pytest.raises(ConfigError):
        parse_size("k", "0MB")
    with pytest.raises(ConfigError):
        parse_duration("k", "-1s")


def test_a_destination_without_detour_after_waits_ten_minutes(tmp_path: Path) -> None:
    config = seed_config(tmp_path, SEED.replace('detour_after = "10m"\n', ""))
    assert config.destinations["ituki-ex@gmail.com"].detour_after == 600.0


SIGNING = """
[signing]
domain = "example.com"
selector = "md1"
dkim_key = "keys/dkim.key"
srs_secret_file = "keys/srs.secret"
"""


def test_signing_turns_inbound_checks_on_by_default(tmp_path: Path) -> None:
    plain = seed_config(tmp_path)
    assert plain.signing is None and not plain.checks.inbound
    signed = seed_config(tmp_path, SEED + SIGNING)
    assert signed.signing is not None and signed.signing.dkim_key == (tmp_path / "keys/dkim.key").resolve()
    assert signed.checks.inbound and signed.checks.authserv_id == "mx.example.com"
    off = seed_config(tmp_path, SEED + SIGNING + "\n[checks]\ninbound = false\n")
    assert not off.checks.inbound


def test_the_signing_domain_must_be_ours(tmp_path: Path) -> None:
    err = error_for(tmp_path, SEED + SIGNING.replace('domain = "example.com"', 'domain = "other.org"'))
    assert err.key == "signing.domain"


def test_signing_needs_its_keys_named(tmp_path: Path) -> None:
    err = error_for(tmp_path, SEED + SIGNING.replace('selector = "md1"\n', ""))
    assert err.key == "signing.selector" and "required" in err.reason


def test_skip_when_takes_only_known_conditions(tmp_path: Path) -> None:
    ok = seed_config(tmp_path, SEED.replace('detour_after = "10m"', 'detour_after = "10m"\nskip_when = ["dmarc-fail"]'))
    assert ok.destinations["ituki-ex@gmail.com"].skip_when == ("dmarc-fail",)
    err = error_for(tmp_path, SEED.replace('detour_after = "10m"', 'detour_after = "10m"\nskip_when = ["dmarc-bad"]'))
    assert err.key == 'destination."ituki-ex@gmail.com".skip_when[0]'


def test_a_forward_target_at_our_domain_must_lead_somewhere(tmp_path: Path) -> None:
    text = SEED + '\n[forward."team@example.com"]\nto = ["nobody@example.com"]\n'
    assert error_for(tmp_path, text).key == 'forward."team@example.com".to[0]'


def test_delivery_limits_have_defaults_and_can_be_set(tmp_path: Path) -> None:
    defaults = seed_config(tmp_path).delivery
    assert (defaults.max_parallel_attempts, defaults.connection_idle_timeout, defaults.message_cache) == (
        200, 5.0, 8 * 1024 * 1024)
    text = SEED.replace('relay = {', 'max_parallel_attempts = 20\nconnection_idle_timeout = "0s"\n'
                                     'message_cache = 0\nrelay = {')
    changed = seed_config(tmp_path, text).delivery
    assert (changed.max_parallel_attempts, changed.connection_idle_timeout, changed.message_cache) == (20, 0.0, 0)
    assert changed.retry.first == 60.0 and changed.retry.longest == 3600.0
    bad = SEED.replace('relay = {', 'max_parallel_attempts = 0\nrelay = {')
    assert error_for(tmp_path, bad).key == "delivery.max_parallel_attempts"


# --- issue 12: `check` catches the rest ---------------------------------------------------------
@pytest.mark.parametrize("detour", ["nobody@example.com", "nobody@gm.example.net"])
def test_a_single_detour_target_at_our_domain_that_leads_nowhere_is_an_error(tmp_path: Path, detour: str) -> None:
    err = error_for(tmp_path, SEED.replace('detour       = "ituki@gm.example.net"', f'detour = "{detour}"'))
    assert err.key == 'destination."ituki-ex@gmail.com".detour'
    assert err.reason == f"{detour} is at our own domain but is neither a mailbox nor forwarded"


@pytest.mark.parametrize("listen", ["0.0.0.0:110", "[::]:110", "192.0.2.10:110", "mx.example.com:110"])
def test_plain_pop3_off_loopback_without_tls_is_an_error_because_every_login_would_be_refused(
        tmp_path: Path, listen: str) -> None:
    err = error_for(tmp_path, SEED.replace('listen = ["127.0.0.1:1100"]', f'listen = ["127.0.0.1:1100", "{listen}"]'))
    assert err.key == "pop3.listen[1]"
    assert "every login from them is refused" in err.reason
    assert "plaintext authentication disallowed on non-secure connections" in err.reason  # what clients would get


@pytest.mark.parametrize("extra", ['allow_plaintext = true', 'tls_cert = "c.pem"\ntls_key = "k.pem"'])
def test_plain_pop3_off_loopback_is_fine_with_stls_or_allow_plaintext(tmp_path: Path, extra: str) -> None:
    listen = 'listen = ["0.0.0.0:110", "[::1]:110", "localhost:1100"]'
    text = SEED.replace('listen = ["127.0.0.1:1100"]', f"{listen}\n{extra}")
    assert len(seed_config(tmp_path, text).pop3.listen) == 3


def test_password_hash_takes_what_maildetour_passwd_and_doveadm_make(tmp_path: Path) -> None:
    from maildetour.core.password import hash_password, hash_scrypt

    for encoded in (hash_password("pw"), hash_scrypt("pw")):
        text = SEED.replace('password = "change-me"', f'password_hash = "{encoded}"', 1)
        assert seed_config(tmp_path, text).mailboxes["ituki@pc.example.net"].password_hash == encoded
    err = error_for(tmp_path, SEED.replace('password = "change-me"', 'password_hash = "{SHA512-CRYPT}$6$a$b"', 1))
    assert err.key == 'mailbox."ituki@pc.example.net".password_hash'
    assert "{SHA512-CRYPT} is not a scheme maildetour verifies" in err.reason

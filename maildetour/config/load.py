"""Read the TOML config file into `config.model.Config`.

Pure apart from reading the file. Unknown keys are errors (a typo must not silently disable a
detour). Every error is a `ConfigError` whose message names the key and the reason; the CLI
prints it on one line and exits 1.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

from maildetour.config.model import (
    DEFAULT_DETOUR_AFTER,
    EVENT_LOOPS,
    IMAP_CONNECTIONS,
    IMAP_PORTS,
    IMAP_TIMEOUT,
    LMTP_UNIX_PREFIX,
    MAX_WORKERS,
    SRS_HASH_LENGTH,
    SRS_SECRET_NAME,
    TLS_MODES,
    ChecksConfig,
    Config,
    DeliveryConfig,
    Forward,
    ImapAccount,
    LmtpServer,
    Mailbox,
    MetricsConfig,
    Pop3Config,
    Pop3Settings,
    ServerConfig,
    SigningConfig,
    SmtpConfig,
    SrsConfig,
    StoreConfig,
)
from maildetour.config.reader import (
    ConfigError,
    Table,
    address_key,
    parse_duration,
    parse_hostport,
    parse_size,
)
from maildetour.core.address import Address, AddressError, check_domain, parse_address
from maildetour.core.destinations import (
    IMAP_PREFIX,
    SKIP_CONDITIONS,
    Destination,
    detour_chain,
    is_imap,
)
from maildetour.core.hostport import HostPort
from maildetour.core.password import hash_problem
from maildetour.core.routing import Accept, route


def load_config(path: Path) -> Config:
    """Read and validate `path`. Raises ConfigError (or OSError if the file cannot be read)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not UTF-8 text") from None
    return build_config(raw, path.resolve())


def build_config(raw: dict[str, Any], path: Path) -> Config:
    base = path.parent
    top = Table("", raw)
    server = _server(top.sub_table("server"), base)
    smtp = _smtp(top.sub_table("smtp"), base)
    pop3 = _pop3(top.sub_table("pop3"), base)
    delivery = _delivery(top.sub_table("delivery"), base)
    mailboxes = _mailboxes(top.sub_table("mailbox"))
    forwards = _forwards(top.sub_table("forward"))
    destinations = _destinations(top.sub_table("destination"))
    signing, signing_secret = _signing(top, base)
    checks = _checks(top.sub_table("checks"), server.hostname, signing is not None)
    srs = _srs(top.sub_table("srs"), base, server, smtp, mailboxes, signing, signing_secret)
    imap = _imap(top.sub_table("imap"), base)
    metrics = _metrics(top.sub_table("metrics"))
    store = _store(top.sub_table("store"))
    server = _one_process_per_node(server, store, raw)
    top.finish()
    config = Config(path, server, smtp, pop3, delivery, mailboxes, forwards, destinations, signing, checks,
                    srs, imap, metrics, store=store)
    _cross_check(config)
    return config


def _one_process_per_node(server: ServerConfig, store: StoreConfig, raw: dict[str, Any]) -> ServerConfig:
    """With `[store] url` a node is one process (the SMTP intake workers share SQLite's file,
    not a database's leases): more capacity is more nodes. `server.workers` > 1 is refused
    there; left out, it is 1."""
    if store.url is None or server.workers == 1:
        return server
    given = raw.get("server", {})
    if isinstance(given, dict) and "workers" in given:
        raise ConfigError("server.workers", "with store.url each node is one process; run more nodes instead")
    return dataclasses.replace(server, workers=1)


def _relative(base: Path) -> Callable[[str, object], Path]:
    def convert(key: str, value: object) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a path, got {value!r}")
        return (base / value).resolve()

    return convert


def _listen(t: Table, sub: str, default: tuple[HostPort, ...]) -> tuple[HostPort, ...]:
    items = t.strings(sub, None)  # type: ignore[arg-type]
    if items is None:
        return default
    return tuple(parse_hostport(f"{t.name(sub)}[{i}]", v) for i, v in enumerate(items))


def _positive_int(t: Table, sub: str, default: int) -> int:
    value = t.get(sub, int, default)
    if value <= 0:
        raise ConfigError(t.name(sub), f"must be positive, got {value}")
    return value


def _non_negative_int(t: Table, sub: str, default: int) -> int:
    value = t.get(sub, int, default)
    if value < 0:
        raise ConfigError(t.name(sub), f"must be 0 or more, got {value}")
    return value


def _size_or_zero(key: str, value: object) -> int:
    """A size, or 0 to switch the thing off."""
    return 0 if value == 0 or value == "0" else parse_size(key, value)


def _port(t: Table, sub: str, default: int) -> int:
    value = t.get(sub, int, default)
    if not 0 < value < 65536:
        raise ConfigError(t.name(sub), f"not a port number: {value}")
    return value


def _server(t: Table, base: Path) -> ServerConfig:
    d = ServerConfig()
    hostname = t.get("hostname", str, d.hostname)
    if isinstance(check_domain(hostname), AddressError) and hostname != "localhost":
        raise ConfigError(t.name("hostname"), f"{hostname!r} is not a host name")
    state_dir = t.convert("state_dir", _relative(base), (base / d.state_dir).resolve())
    workers = t.get("workers", int, d.workers)
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(t.name("workers"), f"expected 1 to {MAX_WORKERS} processes, got {workers}")
    event_loop = t.get("event_loop", str, d.event_loop)
    if event_loop not in EVENT_LOOPS:
        raise ConfigError(t.name("event_loop"), f"expected one of {', '.join(EVENT_LOOPS)}, got {event_loop!r}")
    node = t.get("node", str, d.node)
    if node is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,62}", node):
        raise ConfigError(t.name("node"), f"expected a name of letters, digits and . _ : - (up to 63), got {node!r}")
    t.finish()
    return ServerConfig(hostname, state_dir, workers, event_loop, node)


def _tls_pair(t: Table, base: Path) -> tuple[Path | None, Path | None]:
    cert = t.convert("tls_cert", _relative(base), None)
    key = t.convert("tls_key", _relative(base), None)
    if (cert is None) != (key is None):
        raise ConfigError(t.name("tls_key" if cert else "tls_cert"), "tls_cert and tls_key go together")
    return cert, key


def _smtp(t: Table, base: Path) -> SmtpConfig:
    d = SmtpConfig()
    domains = []
    for i, name in enumerate(t.strings("domains")):
        checked = check_domain(name)
        if isinstance(checked, AddressError):
            raise ConfigError(f"{t.name('domains')}[{i}]", f"{name!r}: {checked.reason}")
        domains.append(checked)
    cert, key = _tls_pair(t, base)
    # Per-client limits (inbound.limits): see SmtpConfig for each reason.
    import ipaddress

    max_sessions = _positive_int(t, "max_sessions", d.max_sessions)
    per_client = _positive_int(t, "max_sessions_per_client",
                               max(1, min(d.max_sessions_per_client, max_sessions // 2)))
    if per_client > max_sessions:
        raise ConfigError(t.name("max_sessions_per_client"), f"must not exceed max_sessions ({max_sessions})")

    def rate(sub: str, default: int) -> int:  # 0 turns the limit off
        value = t.get(sub, int, default)
        if value < 0:
            raise ConfigError(t.name(sub), f"must be 0 (no limit) or positive, got {value}")
        return value

    def seconds(sub: str, default: float) -> float:
        value = t.convert(sub, parse_duration, default)
        if value <= 0:
            raise ConfigError(t.name(sub), "must be positive")
        return value

    unlimited = []
    for i, text in enumerate(t.strings("unlimited_clients", d.unlimited_clients)):
        try:
            unlimited.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(f"{t.name('unlimited_clients')}[{i}]", f"{text!r} is not an address or network") from None
    config = SmtpConfig(
        listen=_listen(t, "listen", d.listen),
        domains=tuple(domains),
        max_message_size=t.convert("max_message_size", parse_size, d.max_message_size),
        max_received=_positive_int(t, "max_received", d.max_received),
        max_sessions=max_sessions,
        max_recipients=_positive_int(t, "max_recipients", d.max_recipients),
        command_timeout=t.convert("command_timeout", parse_duration, d.command_timeout),
        data_timeout=t.convert("data_timeout", parse_duration, d.data_timeout),
        max_line_length=_positive_int(t, "max_line_length", d.max_line_length),
        max_bytes_receiving=t.convert("max_bytes_receiving", parse_size, d.max_bytes_receiving),
        min_data_rate=_non_negative_int(t, "min_data_rate", d.min_data_rate),
        tls_cert=cert,
        tls_key=key,
        max_sessions_per_client=per_client,
        max_commands_without_progress=_positive_int(t, "max_commands_without_progress",
                                                    d.max_commands_without_progress),
        max_session_time=seconds("max_session_time", d.max_session_time),
        max_refused_recipients=_positive_int(t, "max_refused_recipients", d.max_refused_recipients),
        max_refused_per_client=_positive_int(t, "max_refused_per_client", d.max_refused_per_client),
        refused_window=seconds("refused_window", d.refused_window),
        client_connections_per_minute=rate("client_connections_per_minute", d.client_connections_per_minute),
        client_messages_per_minute=rate("client_messages_per_minute", d.client_messages_per_minute),
        client_recipients_per_minute=rate("client_recipients_per_minute", d.client_recipients_per_minute),
        sender_domain_messages_per_minute=rate("sender_domain_messages_per_minute",
                                               d.sender_domain_messages_per_minute),
        sender_domain_recipients_per_minute=rate("sender_domain_recipients_per_minute",
                                                 d.sender_domain_recipients_per_minute),
        unlimited_clients=tuple(unlimited),
        max_tracked_clients=_positive_int(t, "max_tracked_clients", d.max_tracked_clients),
    )
    t.finish()
    return config


def _pop3(t: Table, base: Path) -> Pop3Config:
    cert, key = _tls_pair(t, base)
    listen_tls = _listen(t, "listen_tls", ())
    if listen_tls and cert is None:
        raise ConfigError(t.name("listen_tls"), "needs tls_cert and tls_key")
    config = Pop3Config(
        listen=_listen(t, "listen", ()),
        listen_tls=listen_tls,
        tls_cert=cert,
        tls_key=key,
        settings=Pop3Settings(allow_insecure_login=t.get("allow_plaintext", bool, False)),
        passwd_file=t.convert("passwd_file", _relative(base), None),
    )
    _check_pop3_plaintext(t, config)
    t.finish()
    return config


def _check_pop3_plaintext(t: Table, config: Pop3Config) -> None:
    """A plain listener off loopback with no certificate (so no STLS) and no allow_plaintext
    would refuse every login from elsewhere (pop3.protocol, RFC 2595): say so now (issue 12)."""
    if config.tls_cert is not None or config.settings.allow_insecure_login:
        return
    for i, where in enumerate(config.listen):
        if not _is_loopback_host(where.host):
            raise ConfigError(
                f"{t.name('listen')}[{i}]",
                f"{where.host}:{where.port} takes clients from other hosts, but without TLS every login from "
                "them is refused (\"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\", "
                "RFC 2595): set tls_cert and tls_key (STLS), use listen_tls, or allow_plaintext = true behind a "
                "trusted network")


def _is_loopback_host(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: its addresses are other hosts' to reach


def _metrics(t: Table) -> MetricsConfig:
    """`[metrics] listen = "host:port"`: one endpoint, or none at all when not given."""
    config = MetricsConfig(listen=t.convert("listen", parse_hostport, None))
    t.finish()
    return config


def _store(t: Table) -> StoreConfig:
    """`[store]`: retention of finished messages and quarantined copies ("0": for ever)."""
    d = StoreConfig()

    def kept_for(sub: str, default: float | None) -> float | None:
        value = t.convert(sub, parse_duration, default)
        return None if value == 0 else value

    interval = t.convert("sweep_interval", parse_duration, d.sweep_interval)
    if interval <= 0:
        raise ConfigError(t.name("sweep_interval"), "must be positive")
    url = t.get("url", str, d.url)
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(t.name("url"), "expected a PostgreSQL URL, \"postgresql://user@host/database\"")
    lease = t.convert("lease", parse_duration, d.lease)
    if lease < 3:
        raise ConfigError(t.name("lease"), "must be at least 3s (it is renewed every third of it)")
    connections = t.get("connections", int, d.connections)
    if connections < 2:
        raise ConfigError(t.name("connections"), f"expected at least 2, got {connections}")
    config = StoreConfig(retention=kept_for("retention", d.retention),
                         quarantine_retention=kept_for("quarantine_retention", d.quarantine_retention),
                         sweep_interval=interval, url=url, lease=lease, connections=connections)
    t.finish()
    return config


def _tls_mode(t: Table, sub: str, default: str) -> str:
    mode = t.get(sub, str, None)
    if mode is None:
        return default
    if mode not in TLS_MODES:
        raise ConfigError(t.name(sub), f"expected one of {', '.join(TLS_MODES)}, got {mode!r}")
    return mode


def _delivery(t: Table, base: Path) -> DeliveryConfig:
    d = DeliveryConfig()
    relay_table = t.sub_table("relay")
    relay: dict[str, HostPort] = {}
    for domain, target in relay_table.data.items():
        relay_table.used.add(domain)
        checked = check_domain(domain)
        if isinstance(checked, AddressError):
            raise ConfigError(relay_table.name(domain), checked.reason)
        relay[checked] = parse_hostport(relay_table.name(domain), target)
    tls = _tls_mode(t, "tls", d.tls)
    policy_table = t.sub_table("tls_policy")
    tls_policy: dict[str, str] = {}
    for domain in list(policy_table.data):
        checked = check_domain(domain)
        if isinstance(checked, AddressError):
            raise ConfigError(policy_table.name(domain), checked.reason)
        tls_policy[checked] = _tls_mode(policy_table, domain, "")
    config = DeliveryConfig(
        relay=relay,
        dns_servers=_listen(t, "dns_servers", ()),
        smtp_port=_port(t, "smtp_port", d.smtp_port),
        connect_timeout=t.convert("connect_timeout", parse_duration, d.connect_timeout),
        command_timeout=t.convert("command_timeout", parse_duration, d.command_timeout),
        data_timeout=t.convert("data_timeout", parse_duration, d.data_timeout),
        max_connections_per_host=_positive_int(t, "max_connections_per_host", d.max_connections_per_host),
        retry_first=t.convert("retry_first", parse_duration, d.retry_first),
        retry_max=t.convert("retry_max", parse_duration, d.retry_max),
        max_lifetime=t.convert("max_lifetime", parse_duration, d.max_lifetime),
        tls=tls,
        tls_policy=tls_policy,
        tls_ca_file=t.convert("tls_ca_file", _relative(base), None),
        mta_sts=t.get("mta_sts", bool, d.mta_sts),
        mta_sts_port=_port(t, "mta_sts_port", d.mta_sts_port),
        late_bounce_window=t.convert("late_bounce_window", parse_duration, d.late_bounce_window),
        max_parallel_attempts=_positive_int(t, "max_parallel_attempts", d.max_parallel_attempts),
        max_bytes_in_flight=t.convert("max_bytes_in_flight", parse_size, d.max_bytes_in_flight),
        destination_rate_delay=t.convert("destination_rate_delay", parse_duration, d.destination_rate_delay),
        connection_idle_timeout=t.convert("connection_idle_timeout", parse_duration,
                                          d.connection_idle_timeout),
        message_cache=t.convert("message_cache", _size_or_zero, d.message_cache),
        lmtp=t.convert("lmtp", _lmtp_server(base), None),
    )
    t.finish()
    return config


def _lmtp_server(base: Path) -> Callable[[str, object], LmtpServer]:
    """`"unix:/run/dovecot/lmtp"` (a Unix socket; relative to the config file like every path)
    or `"host:port"` (TCP)."""
    path = _relative(base)

    def convert(key: str, value: object) -> LmtpServer:
        if isinstance(value, str) and value.startswith(LMTP_UNIX_PREFIX):
            socket = value.removeprefix(LMTP_UNIX_PREFIX)
            if not socket:
                raise ConfigError(key, f"expected \"unix:/path/of/socket\" or \"host:port\", got {value!r}")
            return LmtpServer(socket=path(key, socket))
        if isinstance(value, str) and "/" in value:
            raise ConfigError(key, f"{value!r}: a Unix socket is written \"unix:{value}\"")
        try:
            return LmtpServer(address=parse_hostport(key, value))
        except ConfigError:
            raise ConfigError(key, f"expected \"unix:/path/of/socket\" or \"host:port\", got {value!r}") from None

    return convert


def _signing(top: Table, base: Path) -> tuple[SigningConfig | None, Path | None]:
    """[signing], and the SRS secret file it names (`srs_secret_file`, kept from before [srs])."""
    if "signing" not in top.data:
        top.used.add("signing")
        return None, None
    t = top.sub_table("signing")
    path = _relative(base)

    def required(sub: str) -> str:
        value = t.get(sub, str, None)
        if not value:
            raise ConfigError(t.name(sub), "required in [signing]")
        return value

    domain = check_domain(required("domain"))
    if isinstance(domain, AddressError):
        raise ConfigError(t.name("domain"), domain.reason)
    config = SigningConfig(
        domain=domain,
        selector=required("selector"),
        dkim_key=path(t.name("dkim_key"), required("dkim_key")),
        ed25519_selector=t.get("ed25519_selector", str, None),
        ed25519_key=t.convert("ed25519_key", path, None),
    )
    if (config.ed25519_selector is None) != (config.ed25519_key is None):
        raise ConfigError(t.name("ed25519_key"), "ed25519_selector and ed25519_key go together")
    secret = t.convert("srs_secret_file", path, None)
    t.finish()
    return config, secret


def _srs(t: Table, base: Path, server: ServerConfig, smtp: SmtpConfig, mailboxes: dict[str, Mailbox],
         signing: SigningConfig | None, signing_secret: Path | None) -> SrsConfig | None:
    """SRS is always on: the domain is [srs].domain, else [signing].domain, else the first of
    smtp.domains (or of the mailbox domains); the secret is [srs].secret_file, else
    [signing].srs_secret_file, else state_dir/srs.secret, made at the first start."""
    secret = t.convert("secret_file", _relative(base), None)
    if secret is not None and signing_secret is not None and secret != signing_secret:
        raise ConfigError(t.name("secret_file"), "[signing] srs_secret_file names another file: give one")
    secret = secret or signing_secret
    fallback = signing.domain if signing is not None else (smtp.domains or
                                                           tuple(a.split("@")[1] for a in mailboxes) or ("",))[0]
    hash_length = t.get("hash_length", int, SRS_HASH_LENGTH)
    if not 4 <= hash_length <= 27:
        raise ConfigError(t.name("hash_length"), f"must be 4..27 (base64 of a SHA-1), got {hash_length}")
    domain = t.get("domain", str, None)
    if domain is not None:
        checked = check_domain(domain)
        if isinstance(checked, AddressError):
            raise ConfigError(t.name("domain"), f"{domain!r}: {checked.reason}")
        domain = checked
    t.finish()
    domain = domain or fallback
    if not domain:
        return None  # no domain at all: nothing is accepted, nothing forwarded
    return SrsConfig(domain, secret or server.state_dir / SRS_SECRET_NAME, made_here=secret is None,
                     hash_length=hash_length)


def _imap(t: Table, base: Path) -> dict[str, ImapAccount]:
    result: dict[str, ImapAccount] = {}
    for name in list(t.data):
        a = t.sub_table(name)
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(t.name(name), "an IMAP account name is letters, digits, '-', '_' and '.'")
        host = a.get("host", str, None)
        user = a.get("user", str, None)
        for key, value in (("host", host), ("user", user)):
            if not value:
                raise ConfigError(a.name(key), f"required in [imap.\"{name}\"]")
        tls = a.get("tls", str, "implicit")
        if tls not in IMAP_PORTS:
            raise ConfigError(a.name("tls"), f'expected "implicit" or "starttls", got {tls!r}')
        auth = a.get("auth", str, "password")
        if auth not in ("password", "xoauth2"):
            raise ConfigError(a.name("auth"), f'expected "password" or "xoauth2", got {auth!r}')
        account = ImapAccount(
            name=name, host=host, port=_port(a, "port", IMAP_PORTS[tls]), tls=tls, user=user,
            folder=a.get("folder", str, "INBOX") or "INBOX", auth=auth,
            password_file=a.convert("password_file", _relative(base), None),
            password_command=a.get("password_command", str, None) or None,
            token_command=a.get("token_command", str, None) or None,
            ca_file=a.convert("ca_file", _relative(base), None),
            timeout=a.convert("timeout", parse_duration, IMAP_TIMEOUT),
            connections=_positive_int(a, "connections", IMAP_CONNECTIONS),
        )
        secrets = [k for k in ("password_file", "password_command", "token_command") if getattr(account, k)]
        wanted = ["token_command"] if auth == "xoauth2" else ["password_file", "password_command"]
        if len(secrets) != 1 or secrets[0] not in wanted:
            raise ConfigError(a.name(secrets[1] if len(secrets) > 1 else wanted[0]),
                              f"auth = \"{auth}\" takes exactly one of {' or '.join(wanted)}")
        a.finish()
        result[name] = account
    return result


def _checks(t: Table, hostname: str, signing: bool) -> ChecksConfig:
    config = ChecksConfig(
        inbound=t.get("inbound", bool, signing),
        authserv_id=t.get("authserv_id", str, hostname) or hostname,
        timeout=t.convert("timeout", parse_duration, ChecksConfig().timeout),
    )
    if config.timeout <= 0:  # every check would be temperror
        raise ConfigError(t.name("timeout"), "must be more than 0")
    t.finish()
    return config


def _mailboxes(t: Table) -> dict[str, Mailbox]:
    result: dict[str, Mailbox] = {}
    for name in list(t.data):
        box = t.sub_table(name)
        address = address_key(t.name(name), name)
        password = box.get("password", str, None)
        password_hash = box.get("password_hash", str, None)
        if password == "":  # it would match an empty PASS (issue 10 #10)
            raise ConfigError(box.name("password"), "must not be empty")
        if password is not None and password_hash is not None:
            raise ConfigError(box.name("password_hash"), "give password or password_hash, not both")
        if password_hash is not None and (problem := hash_problem(password_hash)) is not None:
            raise ConfigError(box.name("password_hash"), problem)
        box.finish()
        if address in result:
            raise ConfigError(t.name(name), "mailbox defined twice (addresses ignore case)")
        result[address] = Mailbox(address, password, password_hash)
    return result


def _forwards(t: Table) -> tuple[Forward, ...]:
    result: list[Forward] = []
    seen: set[str] = set()
    for name in list(t.data):
        rule = t.sub_table(name)
        key = t.name(name)
        if name.startswith("@"):
            checked = check_domain(name[1:])
            if isinstance(checked, AddressError):
                raise ConfigError(key, f"catch-all {name!r}: {checked.reason}")
            pattern = "@" + checked
        else:
            pattern = address_key(key, name)
        targets = rule.strings("to")
        if not targets:
            raise ConfigError(rule.name("to"), "a forward needs at least one target")
        to = tuple(address_key(f"{rule.name('to')}[{i}]", v) for i, v in enumerate(targets))
        rule.finish()
        if pattern in seen:
            raise ConfigError(key, "forward defined twice (addresses ignore case)")
        seen.add(pattern)
        result.append(Forward(pattern, to))
    return tuple(result)


def _destinations(t: Table) -> dict[str, Destination]:
    result: dict[str, Destination] = {}
    for name in list(t.data):
        dest = t.sub_table(name)
        address = address_key(t.name(name), name)
        skip = dest.strings("skip_when")
        for i, word in enumerate(skip):
            if word not in SKIP_CONDITIONS:
                raise ConfigError(f"{dest.name('skip_when')}[{i}]",
                                  f"{word!r} is not one of {', '.join(SKIP_CONDITIONS)}")
        result[address] = Destination(
            address=address,
            hidden=dest.get("hidden", bool, False),
            detour=_detour_steps(dest),
            detour_after=dest.convert("detour_after", parse_duration, DEFAULT_DETOUR_AFTER),
            tls=_tls_mode(dest, "tls", "") or None,
            skip_when=skip,
        )
        dest.finish()
    return result


def _detour_steps(dest: Table) -> tuple[str, ...]:
    """`detour = "a@b"` or a list of steps; each an address or "imap:NAME"."""
    key = dest.name("detour")
    value = dest.get("detour", (str, list), [])
    items = [(key, value)] if isinstance(value, str) else [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    steps: list[str] = []
    for item_key, item in items:
        if isinstance(item, str) and is_imap(item):
            step = item
        else:
            step = address_key(item_key, item)
        if step in steps:
            raise ConfigError(item_key, f"{step!r} is already a step of this detour")
        steps.append(step)
    return tuple(steps)


def _cross_check(config: Config) -> None:
    """Rules that span tables: domains of mailboxes/forwards, detour chains without cycles."""
    local_domains = set(config.smtp.domains) | {a.split("@")[1] for a in config.mailboxes}
    for rule in config.forwards:
        domain = rule.pattern.split("@")[1]
        if domain not in local_domains:
            raise ConfigError(
                f'forward."{rule.pattern}"', f"domain {domain!r} is not in smtp.domains or a mailbox domain"
            )
        for target in rule.to:
            if target == rule.pattern:
                raise ConfigError(f'forward."{rule.pattern}".to', "a forward cannot target itself")
    _check_local_targets(config)
    _check_lmtp(config)
    _check_shared_srs(config)
    if config.srs is not None and config.srs.domain not in local_domains:
        key = "srs.domain" if config.signing is None or config.srs.domain != config.signing.domain \
            else "signing.domain"
        raise ConfigError(key, f"{config.srs.domain!r} must be one of smtp.domains or a mailbox domain "
                          "(late bounces come back to SRS addresses there)")
    for dest in config.destinations.values():
        chain = detour_chain(config.destinations, dest.address)
        if chain.loop is not None:
            raise ConfigError(f'destination."{dest.address}".detour', "detour chain loops: " + " -> ".join(chain.loop))
        for i, step in enumerate(dest.detour):
            key = f'destination."{dest.address}".detour' + (f"[{i}]" if len(dest.detour) > 1 else "")
            if is_imap(step) and step.removeprefix(IMAP_PREFIX) not in config.imap:
                raise ConfigError(key, f"{step!r} names no [imap.\"{step.removeprefix(IMAP_PREFIX)}\"] table")
            parsed = parse_address(step)
            if isinstance(parsed, Address) and parsed.domain in local_domains and step not in config.mailboxes \
                    and not isinstance(route(config.routing_table(), parsed), Accept):
                raise ConfigError(key, f"{step} is at our own domain but is neither a mailbox nor forwarded")


def _check_local_targets(config: Config) -> None:
    """A forward target at one of our own domains must lead somewhere (a mailbox or another
    rule); otherwise every copy would loop back to us and be refused."""
    table = config.routing_table()
    for rule in config.forwards:
        for i, target in enumerate(rule.to):
            parsed = parse_address(target)
            if isinstance(parsed, Address) and parsed.domain in table.domains:
                if not isinstance(route(table, parsed), Accept):
                    raise ConfigError(f'forward."{rule.pattern}".to[{i}]',
                                      f"{target} is at our own domain but is neither a mailbox nor forwarded")


def _check_lmtp(config: Config) -> None:
    """With `[delivery] lmtp` the mail store keeps the mailboxes and serves them (POP3, IMAP):
    our own Maildirs would stay empty, so a POP3 listener of ours would show empty mailboxes."""
    lmtp = config.delivery.lmtp
    if lmtp is None:
        return
    for key, listeners in (("pop3.listen", config.pop3.listen), ("pop3.listen_tls", config.pop3.listen_tls)):
        if listeners:
            raise ConfigError(key, f"the mailboxes are stored by the LMTP server (delivery.lmtp = \"{lmtp}\"), "
                              "so maildetour's own would stay empty: POP3 and IMAP are the mail store's to serve "
                              "(e.g. Dovecot); remove this listener")


def _check_shared_srs(config: Config) -> None:
    """With `[store] url` several nodes share the queue, and a late bounce to an SRS address one
    node made may reach another: every node must decode it, so the secret is one named file with
    the same content everywhere, not one made in each node's state dir."""
    if config.store.url is not None and config.srs is not None and config.srs.made_here:
        raise ConfigError("srs.secret_file", "with [store] url every node must use the same SRS secret: "
                          "name a file here and give every node the same one (make it once, e.g. "
                          "`head -c 18 /dev/urandom | base64 > srs.secret`, mode 0600)")

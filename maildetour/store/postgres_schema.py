"""The PostgreSQL store's schema: its versions and migrations, beside the SQLite ones.

What: the same version numbers as `store.schema` (a version names what the queue holds, in
either engine). PostgreSQL stores begin at version 5, the schema of the release that brought
them, in one migration; every later version is one more step in both lists (a test keeps the
two `VERSION`s equal). What PostgreSQL holds beyond SQLite's tables: the message bytes
(`bodies`, bytea: any node can deliver any message), each copy's lease (`lease_node`,
`lease_until`: which node may attempt it, until when) and the live nodes (`nodes`). The
version is the one row of `schema_version`. `migrate` runs under a transaction-level advisory
lock, so nodes that start at once upgrade once; PostgreSQL's DDL is transactional, so a failed
step leaves the database as it was. Before an upgrade the operator's copy is `pg_dump`
(docs/operations.md): a database server is not ours to copy files of.

Contract: a migration only adds (as in `store.schema`). A database from a newer maildetour is
refused (`SchemaTooNew`), an older one is upgraded only by `serve` (the operator's commands
refuse it: `SchemaTooOld`). Exposure: internal; the URL is the operator's (never printed with
its password: `describe_url`). Failure: psycopg errors to the caller (the store maps them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from maildetour.store.schema import Migration, SchemaTooNew, SchemaTooOld

log = logging.getLogger("maildetour.store")

# Times are Unix seconds (double precision), as in SQLite, on the clock of the node that wrote
# them; lease ends are on the database's clock (`DB_NOW`), so nodes' clocks may differ a little.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(5, "the queue in PostgreSQL: messages and their bytes, copies with leases, events, nodes", (
        """CREATE TABLE messages (
            queue_id text PRIMARY KEY,
            mail_from text NOT NULL,
            received_at double precision NOT NULL,
            message_id text NOT NULL,
            size bigint NOT NULL,
            client text NOT NULL,
            finished boolean NOT NULL DEFAULT false,
            keep_until double precision,
            finished_at double precision
        )""",
        "CREATE INDEX messages_message_id ON messages(message_id)",
        "CREATE INDEX messages_finished ON messages(finished_at) WHERE finished",
        "CREATE INDEX messages_unfinished ON messages(received_at) WHERE NOT finished",
        "CREATE INDEX messages_kept ON messages(keep_until) WHERE keep_until IS NOT NULL",
        # Apart from the rows the queue reads all day: removed when the message finishes (its
        # space is then vacuumed), kept as long as a copy or a late bounce may need them.
        """CREATE TABLE bodies (
            queue_id text PRIMARY KEY REFERENCES messages(queue_id) ON DELETE CASCADE,
            data bytea NOT NULL
        )""",
        """CREATE TABLE copies (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue_id text NOT NULL REFERENCES messages(queue_id),
            recipient text NOT NULL,
            target text NOT NULL,
            origin text NOT NULL,
            hidden_origin boolean NOT NULL,
            state text NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            next_at double precision NOT NULL,
            first_failure double precision,
            detours integer NOT NULL DEFAULT 0,
            attempt_started double precision,
            lease_node text,
            lease_until double precision
        )""",
        "CREATE INDEX copies_queue_id ON copies(queue_id)",
        "CREATE INDEX copies_due ON copies(next_at) WHERE state = 'queued'",
        "CREATE INDEX copies_quarantined ON copies(next_at) WHERE state = 'quarantined'",
        "CREATE INDEX copies_in_flight ON copies(id) WHERE attempt_started IS NOT NULL",
        "CREATE INDEX copies_leased ON copies(lease_node) WHERE lease_node IS NOT NULL",
        """CREATE TABLE events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue_id text NOT NULL,
            copy_id bigint,
            at double precision NOT NULL,
            kind text NOT NULL,
            target text NOT NULL,
            detail text NOT NULL
        )""",
        "CREATE INDEX events_queue_id ON events(queue_id)",
        # One row per running node, renewed with its leases: a row not renewed in time is a node
        # that died, and the others read the queue again to take its work.
        """CREATE TABLE nodes (
            node text PRIMARY KEY,
            started_at double precision NOT NULL,
            alive_until double precision NOT NULL
        )""",
    )),
)
VERSION = MIGRATIONS[-1].version
FIRST = MIGRATIONS[0].version

DB_NOW = "extract(epoch from clock_timestamp())"  # the database's clock, Unix seconds
_LOCK = 0x6D61696C64  # pg_advisory_xact_lock key: one upgrade at a time ("maild")


def describe_url(url: str) -> str:
    """The URL without its password, for logs and `check`."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host", "")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


async def read_version(conn: psycopg.AsyncConnection) -> int:
    """The schema version of the database: 0 when it has none of our tables yet."""
    cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute("SELECT version FROM schema_version")
    row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


async def migrate(conn: psycopg.AsyncConnection, url: str, *, upgrade: bool) -> int:
    """Make or upgrade the schema (`upgrade`: the server), or refuse an older one (the operator's
    commands); a newer one is always refused. Returns the version found. `conn` in autocommit."""
    path = Path(describe_url(url))  # (the exceptions name "the file": here, the database)
    found = await read_version(conn)
    if found > VERSION:
        raise SchemaTooNew(path, found)
    if found == VERSION:
        return found
    if found and not upgrade:
        raise SchemaTooOld(path, found)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        found = await read_version(conn)  # another node may have done it meanwhile
        if found > VERSION:
            raise SchemaTooNew(path, found)
        if found < VERSION:
            for step in MIGRATIONS:
                if step.version <= found:
                    continue
                for statement in step.statements:
                    await conn.execute(statement)  # (our own constant SQL)
            if found == 0:
                await conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
                await conn.execute("INSERT INTO schema_version VALUES (%s)", (VERSION,))
            else:
                await conn.execute("UPDATE schema_version SET version = %s", (VERSION,))
    if found:
        log.info("%s: schema upgraded from version %d to %d", describe_url(url), found, VERSION)
    return found


def describe(url: str, timeout: float = 5.0) -> str:
    """One line for `maildetour check`: the database's schema version, and what `serve` will do.
    Raises SchemaTooNew, or OSError when the database cannot be reached."""
    shown = describe_url(url)
    try:
        with psycopg.connect(url, connect_timeout=max(int(timeout), 1), autocommit=True) as conn:
            row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
            found = 0
            if row is not None and row[0]:
                got = conn.execute("SELECT version FROM schema_version").fetchone()
                found = int(got[0]) if got is not None else 0
    except psycopg.Error as exc:
        raise OSError(f"cannot read the queue database {shown}: {str(exc).strip().splitlines()[0]}") from None
    if found > VERSION:
        raise SchemaTooNew(Path(shown), found)
    if found == VERSION:
        return f"queue: {shown}: schema version {VERSION}"
    if found == 0:
        return f"queue: {shown} is empty (schema version {VERSION} at the first start)"
    return f"queue: {shown}: schema version {found}; will be upgraded to {VERSION} at start (pg_dump it first)"

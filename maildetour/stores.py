"""The store a config chooses: SQLite in the state dir (one node, the default) or PostgreSQL
(`[store] url`: the queue shared by several nodes), opened for the server or for a command.

Internal. `server_store` is what `serve` runs on (its node name, leases, cache, upgrades at
start); `command_store` what the operator's commands use beside a running server (no leases,
never an upgrade); `node_name` is this server's name among the nodes. Nothing here touches a
database before the store runs. Failure: OSError from opening SQLite's file (PostgreSQL is
reached when the store runs); ConfigError naming `store.url` when psycopg is not installed.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import TYPE_CHECKING, Union

from maildetour.config.model import Config
from maildetour.config.reader import ConfigError
from maildetour.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from maildetour.store.postgres import PostgresStore

# (PostgreSQL's driver is imported only when a config names it: `pip install maildetour[postgresql]`.)
AnyStore = Union[SqliteStore, "PostgresStore"]


def node_name(config: Config) -> str:
    """`[server] node`, or the host name, the pid and a random part (unique at every start)."""
    if config.server.node is not None:
        return config.server.node
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


def server_store(config: Config, *, node: str | None = None) -> AnyStore:
    """The server's store. `node` None: `node_name(config)`."""
    delivery, kept = config.delivery, config.store
    if kept.url is None:
        store: AnyStore = SqliteStore(config.queue_db, config.spool_dir, config.audit_log,
                                      cache_bytes=delivery.message_cache, cache_seconds=delivery.message_cache_seconds)
    else:
        store = _postgres()(kept.url, config.audit_log, node=node or node_name(config), lease=kept.lease,
                              connections=kept.connections, cache_bytes=delivery.message_cache,
                              cache_seconds=delivery.message_cache_seconds, retry_start=True)
    store.recover()
    return store


def command_store(config: Config, *, readonly: bool) -> AnyStore | None:
    """The store for an operator's command; None when there is no queue yet (SQLite's file not
    made). Refuses an older schema (SchemaTooOld, when it runs): the server upgrades it."""
    kept = config.store
    if kept.url is not None:
        return _postgres()(kept.url, None if readonly else config.audit_log, node=None, lease=kept.lease,
                             connections=2, upgrade=False)
    if not config.queue_db.exists():
        return None
    return SqliteStore(config.queue_db, config.spool_dir, config.audit_log, readonly=readonly, upgrade=False)


def _postgres() -> type[PostgresStore]:
    """The PostgreSQL store's class; its driver is an extra (`maildetour[postgresql]`)."""
    try:
        from maildetour.store.postgres import PostgresStore
    except ImportError as exc:
        raise ConfigError("store.url", f"needs the PostgreSQL driver psycopg 3 ({exc.name} is missing): "
                          "pip install 'maildetour[postgresql]'") from None
    return PostgresStore

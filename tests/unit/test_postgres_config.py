"""Issue 14, the keys of a shared PostgreSQL store: `[store] url`, `lease`, `connections`,
`[server] node`, one process per node, and the URL shown without its password."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildetour.config import ConfigError
from maildetour.stores import node_name
from tests.configs import SEED, seed_config
from tests.peers.postgres import need_driver

URL = "postgresql://md:secret@db.example.net:5433/mail"


def with_store(store: str, server: str = "", srs: str = 'secret_file = "srs.secret"') -> str:
    """The seed config on `store`; the nodes' shared SRS secret named unless `srs` is empty."""
    text = SEED.replace('state_dir = "var"', f'state_dir = "var"\n{server}', 1) if server else SEED
    return text + f"\n[store]\n{store}\n" + (f"\n[srs]\n{srs}\n" if srs else "")


def test_the_store_keys_are_read_with_their_defaults(tmp_path: Path) -> None:
    config = seed_config(tmp_path, with_store(f'url = "{URL}"\nlease = "30s"', 'node = "mx1"'))
    assert (config.store.url, config.store.lease, config.store.connections) == (URL, 30.0, 10)
    assert config.server.node == "mx1" and node_name(config) == "mx1"
    assert config.server.workers == 1  # one process per node
    sqlite = seed_config(tmp_path, SEED)
    assert sqlite.store.url is None and sqlite.store.lease == 60.0


@pytest.mark.parametrize(("store", "server", "key"), [
    ('url = "mysql://x/y"', "", "store.url"),
    (f'url = "{URL}"\nlease = "2s"', "", "store.lease"),
    (f'url = "{URL}"\nconnections = 1', "", "store.connections"),
    (f'url = "{URL}"', 'node = "two words"', "server.node"),
    (f'url = "{URL}"', "workers = 4", "server.workers"),
])
def test_bad_store_values_name_their_key(tmp_path: Path, store: str, server: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        seed_config(tmp_path, with_store(store, server))
    assert caught.value.key == key


def test_nodes_must_name_the_srs_secret_they_share(tmp_path: Path) -> None:
    """A late bounce to an SRS address one node made may come back to another node: a secret
    made in each node's own state dir would not decode it there."""
    with pytest.raises(ConfigError) as caught:
        seed_config(tmp_path, with_store(f'url = "{URL}"', srs=""))
    assert caught.value.key == "srs.secret_file" and "same SRS secret" in str(caught.value)
    assert seed_config(tmp_path, SEED).srs is not None  # one node on SQLite: made in its state dir


def test_without_a_node_name_each_start_is_a_new_node(tmp_path: Path) -> None:
    config = seed_config(tmp_path, with_store(f'url = "{URL}"'))
    assert node_name(config) != node_name(config)


def test_the_url_is_shown_without_its_password() -> None:
    need_driver()
    from maildetour.store.postgres_schema import describe_url

    assert describe_url(URL) == "postgresql://md@db.example.net:5433/mail"

"""Opening costtap's SQLite files: the ledger and the outbox share one way to do it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations


def open_database(path: Path, migrations: Migrations) -> Database:
    """Open `path` in WAL mode and apply its pending migrations.

    WAL lets readers (`costtap report`, `costtap outbox status`) work while the proxy
    writes. `synchronous=NORMAL` keeps every committed transaction through a crash of the
    process; FULL would also survive a power loss, at the cost of an fsync per commit.
    The connection runs in autocommit mode, so transactions are opened explicitly.
    Raises sqlite3.Error or OSError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    database = Database(sqlite3.connect(path, timeout=30, isolation_level=None))
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("PRAGMA synchronous=NORMAL")
    migrations.apply(database)
    return database

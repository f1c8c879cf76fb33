"""The embedded ledger: one SQLite row per metered call.

The schema is a named list of migrations, each applied once in its own transaction.
The ledger raises or returns and leaves logging to its callers. A `Ledger` object is bound
to the thread that opened it, as sqlite3 connections are.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from costtap.config.apps import Budget
from costtap.tracker.budgets import (
    Admission,
    Alert,
    Subject,
    check_and_reserve,
    crossed_thresholds,
)
from costtap.tracker.events import UsageEvent, format_time
from costtap.tracker.sqlite import open_database

LEDGER_FILE = "ledger.db"

migrations = Migrations("costtap-ledger")


@migrations(name="0001_events")
def _create_events(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE events (
            request_id TEXT PRIMARY KEY,
            time TEXT NOT NULL,
            app TEXT NOT NULL,
            user TEXT,
            project TEXT,
            job TEXT,
            provider TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            model TEXT,
            units TEXT NOT NULL,
            cost_usd REAL,
            latency_ms INTEGER,
            ttfb_ms INTEGER,
            http_status INTEGER,
            status TEXT NOT NULL,
            estimated INTEGER NOT NULL,
            estimate_reason TEXT
        )
        """
    )
    db.execute("CREATE INDEX events_time ON events (time)")
    db.execute("CREATE INDEX events_app_time ON events (app, time)")


@migrations(name="0002_budgets_and_directory")
def _create_budget_tables(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE reservations (
            request_id TEXT PRIMARY KEY,
            app TEXT NOT NULL,
            user TEXT,
            project TEXT,
            amount_usd REAL NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX reservations_expiry ON reservations (expires_at)")
    db.execute(
        """
        CREATE TABLE alerts_fired (
            budget TEXT NOT NULL,
            scope_value TEXT NOT NULL,
            window_start TEXT NOT NULL,
            threshold REAL NOT NULL,
            fired_at TEXT NOT NULL,
            PRIMARY KEY (budget, scope_value, window_start, threshold)
        )
        """
    )
    db.execute(
        "CREATE TABLE users (external_id TEXT PRIMARY KEY, email TEXT, full_name TEXT, updated_at TEXT NOT NULL)"
    )
    db.execute(
        "CREATE TABLE projects (external_id TEXT PRIMARY KEY, source_app TEXT, name TEXT, "
        "workspace_id TEXT, updated_at TEXT NOT NULL)"
    )


@migrations(name="0003_reservation_ceilings")
def _add_reservation_ceilings(db: Database) -> None:
    # The maximum cost of an admitted call, or NULL when its request does not bound it.
    db.execute("ALTER TABLE reservations ADD COLUMN ceiling_usd REAL")


class LedgerError(Exception):
    """The ledger file cannot be opened or written."""


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = open_database(path, migrations)
        except (sqlite3.Error, OSError) as error:
            raise LedgerError(f"cannot open ledger {path}: {error}") from error

    @classmethod
    def in_dir(cls, data_dir: Path) -> Ledger:
        return cls(data_dir / LEDGER_FILE)

    def release_reservations(self) -> int:
        """Delete every budget reservation; return how many there were.

        At start, reservations belong to calls of a process that ended without recording
        them, so they would only hold budget until they expire.
        """
        try:
            with self.db.conn:
                cursor = self.db.conn.execute("DELETE FROM reservations")
        except sqlite3.Error as error:
            raise LedgerError(
                f"cannot release reservations in ledger {self.path}: {error}"
            ) from error
        return cursor.rowcount

    def preflight(
        self,
        subject: Subject,
        request_id: str,
        estimated_cost: Decimal | None,
        ceiling_cost: Decimal | None,
        budgets: list[Budget],
        now: datetime,
    ) -> Admission:
        """Check the budgets and reserve the estimate and ceiling of an admitted call."""
        try:
            return check_and_reserve(
                self.db.conn, budgets, subject, request_id, estimated_cost, ceiling_cost, now
            )
        except sqlite3.Error as error:
            raise LedgerError(f"cannot check budgets in ledger {self.path}: {error}") from error

    def record(
        self, event: UsageEvent, cost_usd: Decimal | None, budgets: list[Budget]
    ) -> tuple[bool, list[Alert]]:
        """Store the event, release its reservation and return newly crossed thresholds.

        Returns (False, []) when the request id is already stored: a record is never
        counted twice.
        """
        connection = self.db.conn
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                inserted = self.insert(event, cost_usd)
                connection.execute(
                    "DELETE FROM reservations WHERE request_id = ?", [event.request_id]
                )
                alerts: list[Alert] = []
                if inserted and budgets:
                    subject = Subject(event.app, event.user, event.project)
                    alerts = crossed_thresholds(connection, budgets, subject, datetime.now(UTC))
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise LedgerError(f"cannot write to ledger {self.path}: {error}") from error
        return inserted, alerts

    def upsert_user(self, external_id: str, email: str | None, full_name: str | None) -> None:
        self.db.execute(
            "INSERT INTO users (external_id, email, full_name, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (external_id) DO UPDATE SET email = excluded.email, "
            "full_name = excluded.full_name, updated_at = excluded.updated_at",
            [external_id, email, full_name, format_time(datetime.now(UTC))],
        )

    def upsert_project(
        self, external_id: str, source_app: str | None, name: str | None, workspace_id: str | None
    ) -> None:
        self.db.execute(
            "INSERT INTO projects (external_id, source_app, name, workspace_id, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (external_id) DO UPDATE SET "
            "source_app = excluded.source_app, name = excluded.name, "
            "workspace_id = excluded.workspace_id, updated_at = excluded.updated_at",
            [external_id, source_app, name, workspace_id, format_time(datetime.now(UTC))],
        )

    def insert(self, event: UsageEvent, cost_usd: Decimal | None) -> bool:
        """Store one event; return False when its request id is already stored."""
        row = {
            "request_id": event.request_id,
            "time": format_time(event.time),
            "app": event.app,
            "user": event.user,
            "project": event.project,
            "job": event.job,
            "provider": event.provider,
            "endpoint": event.endpoint,
            "model": event.model,
            "units": json.dumps(event.units.to_dict(), sort_keys=True),
            "cost_usd": float(cost_usd) if cost_usd is not None else None,
            "latency_ms": event.latency_ms,
            "ttfb_ms": event.ttfb_ms,
            "http_status": event.http_status,
            "status": str(event.status),
            "estimated": int(event.estimated),
            "estimate_reason": event.estimate_reason,
        }
        columns = ", ".join(f'"{name}"' for name in row)
        placeholders = ", ".join("?" for _ in row)
        try:
            cursor = self.db.execute(
                f"INSERT OR IGNORE INTO events ({columns}) VALUES ({placeholders})",
                list(row.values()),
            )
        except sqlite3.Error as error:
            raise LedgerError(f"cannot write to ledger {self.path}: {error}") from error
        return cursor.rowcount == 1

    def close(self) -> None:
        self.db.close()


def open_for_reading(data_dir: Path) -> sqlite3.Connection:
    """Open the ledger of `data_dir` read-only, for reports.

    Raises LedgerError when no ledger exists there yet.
    """
    path = data_dir / LEDGER_FILE
    if not path.exists():
        raise LedgerError(
            f"no ledger at {path}: run `costtap run --data-dir {data_dir}` first, "
            "or pass the --data-dir that costtap runs with"
        )
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as error:
        raise LedgerError(f"cannot open ledger {path}: {error}") from error
    connection.row_factory = sqlite3.Row
    return connection


def iter_events(
    connection: sqlite3.Connection, since: str | None = None, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Yield stored events, oldest first, in the shape `costtap events` prints."""
    query = "SELECT * FROM events"
    parameters: list[Any] = []
    if since is not None:
        query += " WHERE time >= ?"
        parameters.append(since)
    # With a limit, the newest events are kept; they are still printed oldest first.
    query += " ORDER BY time DESC, request_id DESC"
    if limit is not None:
        query += " LIMIT ?"
        parameters.append(limit)
    rows = list(connection.execute(query, parameters))
    rows.reverse()
    for row in rows:
        yield {
            "time": row["time"],
            "request_id": row["request_id"],
            "app": row["app"],
            "user": row["user"],
            "project": row["project"],
            "job": row["job"],
            "provider": row["provider"],
            "endpoint": row["endpoint"],
            "model": row["model"],
            "units": json.loads(row["units"]),
            "cost_usd": row["cost_usd"],
            "latency_ms": row["latency_ms"],
            "ttfb_ms": row["ttfb_ms"],
            "status": row["status"],
            "estimated": bool(row["estimated"]),
        }

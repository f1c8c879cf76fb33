"""The durable outbox of remote mode: records wait here until the tracker has them.

A record is committed here before anything else happens to it, and is removed only when
the tracker accepted it. Retries reuse the same request id, which the tracker uses to
deduplicate, so a record is never delivered as two events. Records the tracker rejects for
good (a 4xx other than 401, 408 and 429) move to the dead-letter table with the reason.
The outbox raises or returns and leaves logging to its callers; one `Outbox` object is
bound to the thread that opened it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from costtap.tracker.sqlite import open_database

OUTBOX_FILE = "outbox.db"

migrations = Migrations("costtap-outbox")


@migrations(name="0001_outbox")
def _create_outbox(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE pending (
            request_id TEXT PRIMARY KEY,
            payload TEXT NOT NULL,
            created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT
        )
        """
    )
    db.execute("CREATE INDEX pending_due ON pending (next_attempt_at)")
    db.execute(
        """
        CREATE TABLE dead_letters (
            request_id TEXT PRIMARY KEY,
            payload TEXT NOT NULL,
            reason TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            failed_at REAL NOT NULL
        )
        """
    )


class OutboxError(Exception):
    """The outbox file cannot be opened or written."""


@dataclass(frozen=True)
class PendingRecord:
    request_id: str
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    dead: int
    oldest_pending_age_seconds: float | None
    last_error: str | None


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = open_database(path, migrations)
        except (sqlite3.Error, OSError) as error:
            raise OutboxError(f"cannot open outbox {path}: {error}") from error

    @classmethod
    def in_dir(cls, data_dir: Path) -> Outbox:
        return cls(data_dir / OUTBOX_FILE)

    def add(self, request_id: str, payload: dict[str, Any]) -> bool:
        """Commit a record; return False when one with this request id is already waiting."""
        now = time.time()
        cursor = self._execute(
            "INSERT OR IGNORE INTO pending (request_id, payload, created_at, next_attempt_at) VALUES (?, ?, ?, ?)",
            [request_id, json.dumps(payload, sort_keys=True), now, now],
        )
        return cursor.rowcount == 1

    def due(self, limit: int, now: float | None = None) -> list[PendingRecord]:
        rows = self._execute(
            "SELECT request_id, payload, attempts FROM pending WHERE next_attempt_at <= ? "
            "ORDER BY next_attempt_at, created_at LIMIT ?",
            [now if now is not None else time.time(), limit],
        ).fetchall()
        return [PendingRecord(row[0], json.loads(row[1]), row[2]) for row in rows]

    def delivered(self, request_id: str) -> None:
        self._execute("DELETE FROM pending WHERE request_id = ?", [request_id])

    def retry_later(self, request_id: str, error: str, next_attempt_at: float) -> None:
        self._execute(
            "UPDATE pending SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE request_id = ?",
            [error, next_attempt_at, request_id],
        )

    def move_to_dead_letters(self, request_id: str, reason: str) -> None:
        connection = self.db.conn
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "INSERT OR REPLACE INTO dead_letters (request_id, payload, reason, attempts, failed_at) "
                "SELECT request_id, payload, ?, attempts + 1, ? FROM pending WHERE request_id = ?",
                [reason, time.time(), request_id],
            )
            connection.execute("DELETE FROM pending WHERE request_id = ?", [request_id])
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise OutboxError(f"cannot write to outbox {self.path}: {error}") from error

    def retry_all(self) -> tuple[int, int]:
        """Move dead letters back to pending and make every pending record due now.

        Returns (dead letters moved back, pending records made due).
        """
        now = time.time()
        connection = self.db.conn
        try:
            connection.execute("BEGIN IMMEDIATE")
            due = connection.execute("UPDATE pending SET next_attempt_at = ?", [now]).rowcount
            moved = connection.execute(
                "INSERT OR IGNORE INTO pending (request_id, payload, created_at, attempts, next_attempt_at, last_error) "
                "SELECT request_id, payload, failed_at, 0, ?, reason FROM dead_letters",
                [now],
            ).rowcount
            connection.execute("DELETE FROM dead_letters")
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise OutboxError(f"cannot write to outbox {self.path}: {error}") from error
        return moved, due

    def status(self) -> OutboxStatus:
        pending, oldest = self._execute("SELECT COUNT(*), MIN(created_at) FROM pending").fetchone()
        dead = self._execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        last = self._execute(
            "SELECT last_error FROM pending WHERE last_error IS NOT NULL ORDER BY next_attempt_at DESC LIMIT 1"
        ).fetchone()
        age = time.time() - oldest if oldest is not None else None
        return OutboxStatus(pending, dead, age, last[0] if last else None)

    def pending_count(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    def dead_letters(self) -> list[tuple[str, str]]:
        return [
            (row[0], row[1])
            for row in self._execute(
                "SELECT request_id, reason FROM dead_letters ORDER BY failed_at"
            )
        ]

    def close(self) -> None:
        self.db.close()

    def _execute(self, query: str, parameters: list[Any] | None = None) -> sqlite3.Cursor:
        try:
            return self.db.execute(query, parameters or [])
        except sqlite3.Error as error:
            raise OutboxError(f"cannot use outbox {self.path}: {error}") from error

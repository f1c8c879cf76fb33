"""Spend reports over the ledger: grouping, and table, CSV and JSON output."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from typing import Any

from costtap.tracker.budgets import BudgetStatus

# Report dimension -> SQL expression over the events table.
DIMENSIONS: dict[str, str] = {
    "app": "app",
    "user": "user",
    "project": "project",
    "model": "model",
    "provider": "provider",
    "day": "substr(time, 1, 10)",
}
TOTAL_COLUMNS = ("calls", "cost_usd", "unpriced_calls", "estimated_calls")


def parse_dimensions(value: str) -> list[str]:
    """Parse a --by value such as "app,model"; raise ValueError naming a bad dimension."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError("--by is empty: name at least one of " + ", ".join(DIMENSIONS))
    for name in names:
        if name not in DIMENSIONS:
            raise ValueError(
                f"--by: unknown dimension {name!r}, expected some of " + ", ".join(DIMENSIONS)
            )
    return names


def spend_by(
    connection: sqlite3.Connection, dimensions: list[str], since: str | None = None
) -> list[dict[str, Any]]:
    """Return one row per group: the dimensions, calls, cost and counts of doubtful rows.

    `cost_usd` sums priced calls only, and is None for a group without any priced call;
    `unpriced_calls` counts the calls it leaves out.
    """
    keys = ", ".join(f"{DIMENSIONS[name]} AS {name}" for name in dimensions)
    group = ", ".join(str(position) for position in range(1, len(dimensions) + 1))
    query = (
        f"SELECT {keys}, COUNT(*) AS calls, ROUND(SUM(cost_usd), 10) AS cost_usd, "
        "SUM(cost_usd IS NULL) AS unpriced_calls, SUM(estimated) AS estimated_calls "
        "FROM events"
    )
    parameters: list[Any] = []
    if since is not None:
        query += " WHERE time >= ?"
        parameters.append(since)
    query += f" GROUP BY {group} ORDER BY cost_usd IS NULL, cost_usd DESC, {group}"
    return [dict(row) for row in connection.execute(query, parameters)]


def format_rows(rows: list[dict[str, Any]], columns: list[str], output_format: str) -> str:
    if output_format == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    return _format_table(rows, columns)


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column)] + [len(line[index]) for line in cells])
        for index, column in enumerate(columns)
    ]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    for line in cells:
        lines.append(
            "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True))
        )
    if not rows:
        lines.append("(no metered calls)")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


BUDGET_COLUMNS = (
    "budget",
    "scope",
    "scope_value",
    "window",
    "window_start",
    "amount_usd",
    "spent_usd",
    "reserved_usd",
    "in_flight_max_usd",
    "remaining_usd",
    "used_percent",
    "hard",
)


def budget_rows(statuses: list[BudgetStatus]) -> list[dict[str, Any]]:
    return [
        {
            "budget": status.budget.name,
            "scope": status.budget.scope,
            "scope_value": status.scope_value,
            "window": status.budget.window,
            "window_start": status.window_start.date().isoformat(),
            "amount_usd": status.budget.amount_usd,
            "spent_usd": round(status.spent_usd, 10),
            "reserved_usd": round(status.reserved_usd, 10),
            "in_flight_max_usd": round(status.in_flight_ceiling_usd, 10),
            # Adding 0.0 turns a rounded -0.0 into 0.0.
            "remaining_usd": round(status.remaining_usd, 10) + 0.0,
            "used_percent": round(status.used_fraction * 100, 2),
            "hard": status.budget.hard,
        }
        for status in statuses
    ]

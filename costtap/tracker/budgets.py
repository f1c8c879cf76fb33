"""Budgets over the ledger: check and reserve before a call, settle after it.

A preflight reads what each applicable budget has spent in its window (recorded costs plus
live reservations) and, when the call is admitted, reserves the call's estimated cost and
its ceiling in the same transaction. The record replaces the reservation with the actual
cost. Near the end of a hard budget, a call waits until the calls in flight have finished
(see `check_and_reserve`), so a hard budget is overspent by at most one call's actual cost
minus its estimate. Reservations of calls that never finish expire.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

from costtap.config.apps import Budget
from costtap.tracker.events import format_time

# A reservation older than this belongs to a call that never finished.
RESERVATION_TTL = timedelta(minutes=15)

_SCOPE_COLUMNS = {"app": "app", "project": "project", "user": "user"}


@dataclass(frozen=True)
class Subject:
    """The app, user and project a call is charged to, as budgets scope it."""

    app: str
    user: str | None
    project: str | None

    def value(self, scope: str) -> str | None:
        return {"app": self.app, "project": self.project, "user": self.user}.get(scope)


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    # The app, project or user this status is for; None for scope "all".
    scope_value: str | None
    window_start: datetime
    spent_usd: float
    reserved_usd: float
    # The calls in flight at the most they can cost: their ceilings, or their estimates
    # times the budget's `unbounded_call_factor` when their requests set no bound.
    in_flight_ceiling_usd: float = 0.0

    @property
    def remaining_usd(self) -> float:
        return self.budget.amount_usd - self.spent_usd - self.reserved_usd

    @property
    def used_fraction(self) -> float:
        return (self.spent_usd + self.reserved_usd) / self.budget.amount_usd


@dataclass(frozen=True)
class Alert:
    """A threshold crossed for the first time in a window."""

    budget: Budget
    scope_value: str | None
    window_start: datetime
    threshold: float
    spent_usd: float


def window_start(window: str, moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    if window == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def applicable(budgets: list[Budget], subject: Subject) -> list[tuple[Budget, str | None]]:
    """Return each budget that applies to the subject, with the scope value it is keyed on."""
    found: list[tuple[Budget, str | None]] = []
    for budget in budgets:
        if budget.scope == "all":
            found.append((budget, None))
            continue
        value = subject.value(budget.scope)
        if value is None:
            continue
        if budget.id is None or budget.id == value:
            found.append((budget, value))
    return found


def status(
    connection: sqlite3.Connection, budget: Budget, scope_value: str | None, now: datetime
) -> BudgetStatus:
    """Return what a budget has spent and reserved in the window that contains `now`."""
    start = window_start(budget.window, now)
    spent_query = "SELECT COALESCE(SUM(cost_usd), 0) FROM events WHERE time >= ?"
    reserved_query = (
        "SELECT COALESCE(SUM(amount_usd), 0), COALESCE(SUM(COALESCE(ceiling_usd, amount_usd * ?)), 0) "
        "FROM reservations WHERE created_at >= ? AND expires_at > ?"
    )
    spent_parameters: list[object] = [format_time(start)]
    reserved_parameters: list[object] = [
        budget.unbounded_call_factor,
        format_time(start),
        format_time(now),
    ]
    if budget.scope != "all":
        column = _SCOPE_COLUMNS[budget.scope]
        spent_query += f' AND "{column}" = ?'
        reserved_query += f' AND "{column}" = ?'
        spent_parameters.append(scope_value)
        reserved_parameters.append(scope_value)
    spent = connection.execute(spent_query, spent_parameters).fetchone()[0]
    reserved, at_most = connection.execute(reserved_query, reserved_parameters).fetchone()
    return BudgetStatus(budget, scope_value, start, float(spent), float(reserved), float(at_most))


@dataclass(frozen=True)
class Admission:
    """The outcome of a preflight: admitted, denied, or held until calls in flight finish."""

    outcome: Literal["admit", "deny", "hold"]
    reason: str | None = None
    # Denied after a hold: once the calls in flight finish, the call may fit.
    retry_later: bool = False


ADMIT = Admission("admit")


def check_and_reserve(
    connection: sqlite3.Connection,
    budgets: list[Budget],
    subject: Subject,
    request_id: str,
    estimated_cost: Decimal | None,
    ceiling_cost: Decimal | None,
    now: datetime,
) -> Admission:
    """Reserve the estimate unless a hard budget forbids it now or until calls in flight finish.

    For each hard budget, with `spent` the recorded cost in the window:
    - deny when spent + the reservations of calls in flight + this call's estimate exceed
      the amount: the call does not fit even if every call costs its estimate;
    - hold when spent + the calls in flight at their ceilings + this call's estimate exceed
      the amount: the call fits only if the calls in flight cost less than they may;
    - else reserve the estimate and the ceiling (None: the request does not bound its cost).

    So whenever a call is admitted, everything admitted before it fits in the budget at its
    ceiling, and the budget is overspent by at most the last admitted call's actual cost
    minus its estimate. Runs in one IMMEDIATE transaction, so no other writer can slip
    between check and reservation.
    """
    estimate = float(estimated_cost or 0)
    ceiling = float(ceiling_cost) if ceiling_cost is not None else None
    connection.execute("BEGIN IMMEDIATE")
    try:
        for budget, scope_value in applicable(budgets, subject):
            if not budget.hard:
                continue
            current = status(connection, budget, scope_value, now)
            if current.spent_usd + current.reserved_usd + estimate > budget.amount_usd:
                connection.execute("ROLLBACK")
                return Admission("deny", _deny_reason(current, estimate))
            if current.spent_usd + current.in_flight_ceiling_usd + estimate > budget.amount_usd:
                connection.execute("ROLLBACK")
                return Admission("hold", _hold_reason(current, estimate))
        # A call already recorded (it ended while its preflight ran) reserves nothing.
        connection.execute(
            "INSERT OR REPLACE INTO reservations "
            "(request_id, app, user, project, amount_usd, ceiling_usd, created_at, expires_at) "
            "SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM events WHERE request_id = ?)",
            [
                request_id,
                subject.app,
                subject.user,
                subject.project,
                estimate,
                ceiling,
                format_time(now),
                format_time(now + RESERVATION_TTL),
                request_id,
            ],
        )
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return ADMIT


def crossed_thresholds(
    connection: sqlite3.Connection, budgets: list[Budget], subject: Subject, now: datetime
) -> list[Alert]:
    """Return thresholds crossed by recorded spend that have not fired in this window yet.

    Each alert is stored as fired in the same call, so it fires once per window and
    threshold, across restarts too. The caller runs this inside a transaction.
    """
    alerts: list[Alert] = []
    for budget, scope_value in applicable(budgets, subject):
        current = status(connection, budget, scope_value, now)
        for threshold in sorted(budget.thresholds):
            if current.spent_usd < threshold * budget.amount_usd:
                break
            cursor = connection.execute(
                "INSERT OR IGNORE INTO alerts_fired (budget, scope_value, window_start, threshold, fired_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    budget.name,
                    scope_value or "",
                    format_time(current.window_start),
                    threshold,
                    format_time(now),
                ],
            )
            if cursor.rowcount == 1:
                alerts.append(
                    Alert(budget, scope_value, current.window_start, threshold, current.spent_usd)
                )
    return alerts


def all_statuses(
    connection: sqlite3.Connection, budgets: list[Budget], now: datetime
) -> list[BudgetStatus]:
    """Return every budget's status; a budget per app, project or user per value seen."""
    statuses: list[BudgetStatus] = []
    for budget in budgets:
        if budget.scope == "all" or budget.id is not None:
            statuses.append(status(connection, budget, budget.id, now))
            continue
        column = _SCOPE_COLUMNS[budget.scope]
        start = format_time(window_start(budget.window, now))
        values = connection.execute(
            f'SELECT DISTINCT "{column}" FROM events WHERE time >= ? AND "{column}" IS NOT NULL '
            f'UNION SELECT DISTINCT "{column}" FROM reservations WHERE created_at >= ? AND "{column}" IS NOT NULL '
            "ORDER BY 1",
            [start, start],
        ).fetchall()
        statuses.extend(status(connection, budget, value, now) for (value,) in values)
    return statuses


def format_usd(amount: float) -> str:
    """Format dollars with as many decimals as small amounts need: $500.00, $0.0015, $0.00."""
    if amount < 0:
        return f"-{format_usd(-amount)}"
    if amount >= 1 or amount == 0:
        return f"${amount:,.2f}"
    decimals = f"{amount:.6f}".rstrip("0").split(".")[1]
    return f"${amount:.{max(2, len(decimals))}f}"


def _scope_text(current: BudgetStatus) -> str:
    if current.scope_value is None:
        return "all calls"
    return f"{current.budget.scope} {current.scope_value}"


def _hold_reason(current: BudgetStatus, estimate: float) -> str:
    return (
        f"calls in flight may use the rest of budget {current.budget.name!r} for "
        f"{_scope_text(current)}: {format_usd(current.spent_usd)} of "
        f"{format_usd(current.budget.amount_usd)} is spent this {current.budget.window}, the "
        f"calls in flight may cost up to {format_usd(current.in_flight_ceiling_usd)}, and this "
        f"call is estimated at {format_usd(estimate)}"
    )


def _deny_reason(current: BudgetStatus, estimate: float) -> str:
    scope = _scope_text(current)
    used = format_usd(current.spent_usd + current.reserved_usd)
    return (
        f"budget {current.budget.name!r} for {scope} would be exceeded: {used} of "
        f"{format_usd(current.budget.amount_usd)} is used or reserved this {current.budget.window}, "
        f"and this call is estimated at {format_usd(estimate)}"
    )

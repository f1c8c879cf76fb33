"""The ledger and reports over known data sets, on real SQLite files."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from costtap.providers.base import Units
from costtap.tracker.events import Status, UsageEvent
from costtap.tracker.ledger import Ledger, iter_events, open_for_reading
from costtap.tracker.pricing import Pricer
from costtap.tracker.report import spend_by


def make_event(
    request_id: str, app: str, model: str | None, day: int, **overrides: object
) -> UsageEvent:
    fields: dict[str, object] = {
        "request_id": request_id,
        "time": datetime(2026, 11, day, 12, 0, tzinfo=UTC),
        "app": app,
        "provider": "openai",
        "endpoint": "chat.completions",
        "model": model,
        "units": Units(input_tokens=10, output_tokens=5),
        "status": Status.SUCCESS,
        "estimated": False,
    }
    fields.update(overrides)
    return UsageEvent(**fields)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger.in_dir(tmp_path)


def test_migrations_apply_once(tmp_path: Path) -> None:
    Ledger.in_dir(tmp_path).close()
    reopened = Ledger.in_dir(tmp_path)

    applied = list(reopened.db.execute("SELECT name FROM _sqlite_migrations").fetchall())

    assert applied == [
        ("0001_events",),
        ("0002_budgets_and_directory",),
        ("0003_reservation_ceilings",),
    ]


def test_duplicate_request_id_is_ignored(ledger: Ledger) -> None:
    event = make_event("r1", "app", "gpt-4o", 1)

    assert ledger.insert(event, Decimal("0.5")) is True
    assert ledger.insert(event, Decimal("0.5")) is False


def test_report_groups_known_data(ledger: Ledger, tmp_path: Path) -> None:
    ledger.insert(make_event("r1", "billing", "gpt-4o", 1), Decimal("0.25"))
    ledger.insert(make_event("r2", "billing", "gpt-4o", 2), Decimal("0.50"))
    ledger.insert(make_event("r3", "search", "gpt-4o", 2), Decimal("1.00"))
    ledger.insert(make_event("r4", "search", "mystery-model", 3, estimated=True), None)
    ledger.close()

    with open_for_reading(tmp_path) as connection:
        by_app = spend_by(connection, ["app"])
        by_day = spend_by(connection, ["day"], since="2026-11-02T00:00:00.000000Z")
        events = list(iter_events(connection, limit=2))

    assert by_app == [
        {"app": "search", "calls": 2, "cost_usd": 1.0, "unpriced_calls": 1, "estimated_calls": 1},
        {"app": "billing", "calls": 2, "cost_usd": 0.75, "unpriced_calls": 0, "estimated_calls": 0},
    ]
    assert by_day == [
        {
            "day": "2026-11-02",
            "calls": 2,
            "cost_usd": 1.5,
            "unpriced_calls": 0,
            "estimated_calls": 0,
        },
        {
            "day": "2026-11-03",
            "calls": 1,
            "cost_usd": None,
            "unpriced_calls": 1,
            "estimated_calls": 1,
        },
    ]
    assert [event["request_id"] for event in events] == ["r3", "r4"]
    assert events[1]["cost_usd"] is None


def test_pricer_unknown_model_is_null_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    pricer = Pricer()
    when = datetime(2026, 11, 1, tzinfo=UTC)

    first = pricer.price("openai", "no-such-model-9000", Units(input_tokens=5), when)
    second = pricer.price("openai", "no-such-model-9000", Units(input_tokens=5), when)

    assert first is None
    assert second is None
    warnings = [record for record in caplog.records if "no-such-model-9000" in record.getMessage()]
    assert len(warnings) == 1


def test_pricer_cached_tokens_at_cache_rate() -> None:
    # gpt-4o list price: $2.50 per million input tokens, $1.25 cached, $10 output.
    # 4012 cached and 8 uncached input tokens, 4 output tokens:
    # 4012 * 1.25e-6 + 8 * 2.5e-6 + 4 * 10e-6 = 0.005015 + 0.00002 + 0.00004 = 0.005075.
    units = Units(input_tokens=4020, cached_input_tokens=4012, output_tokens=4)

    cost = Pricer().price("openai", "gpt-4o-2024-08-06", units, datetime(2026, 11, 1, tzinfo=UTC))

    assert cost == Decimal("0.005075")

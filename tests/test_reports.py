"""`costtap report --by` and `costtap budgets` on a known data set, and budget windows."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from costtap.config.apps import Budget
from costtap.providers.base import Units
from costtap.tracker.budgets import Subject, crossed_thresholds, window_start
from costtap.tracker.events import Status, UsageEvent
from costtap.tracker.ledger import Ledger
from tests.support.costtap_process import costtap_command

NOW = datetime.now(UTC)
TODAY = NOW.replace(hour=1, minute=0, second=0, microsecond=0)
YESTERDAY = TODAY - timedelta(days=1)

# (request id, time, app, user, project, provider, model, cost)
DATA = [
    ("r1", YESTERDAY, "video", "ana", "p-1", "openai", "gpt-4o", Decimal("0.50")),
    ("r2", TODAY, "video", "ana", "p-1", "openai", "gpt-4o", Decimal("0.25")),
    ("r3", TODAY, "video", "bob", "p-2", "gemini", "gemini-2.5-flash", Decimal("0.10")),
    ("r4", TODAY, "search", "bob", None, "anthropic", "claude-haiku-4-5", Decimal("1.00")),
    ("r5", TODAY, "search", "cy", None, "openai", "mystery-model", None),
]


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(costtap_command(*arguments), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("reports-data")
    ledger = Ledger.in_dir(directory)
    for request_id, time, app, user, project, provider, model, cost in DATA:
        event = UsageEvent(
            request_id=request_id,
            time=time,
            app=app,
            provider=provider,
            endpoint="chat.completions",
            model=model,
            units=Units(input_tokens=10, output_tokens=2),
            status=Status.SUCCESS,
            estimated=request_id == "r3",
            user=user,
            project=project,
        )
        ledger.insert(event, cost)
    ledger.close()
    return directory


def report(data_dir: Path, by: str, *extra: str) -> list[dict[str, object]]:
    result = cli("report", "--data-dir", str(data_dir), "--by", by, "--format", "json", *extra)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_report_by_user(data_dir: Path) -> None:
    assert report(data_dir, "user") == [
        {"user": "bob", "calls": 2, "cost_usd": 1.1, "unpriced_calls": 0, "estimated_calls": 1},
        {"user": "ana", "calls": 2, "cost_usd": 0.75, "unpriced_calls": 0, "estimated_calls": 0},
        {"user": "cy", "calls": 1, "cost_usd": None, "unpriced_calls": 1, "estimated_calls": 0},
    ]


def test_report_by_provider_and_day(data_dir: Path) -> None:
    today, yesterday = TODAY.date().isoformat(), YESTERDAY.date().isoformat()

    rows = report(data_dir, "provider,day")

    assert rows == [
        {
            "provider": "anthropic",
            "day": today,
            "calls": 1,
            "cost_usd": 1.0,
            "unpriced_calls": 0,
            "estimated_calls": 0,
        },
        {
            "provider": "openai",
            "day": yesterday,
            "calls": 1,
            "cost_usd": 0.5,
            "unpriced_calls": 0,
            "estimated_calls": 0,
        },
        {
            "provider": "openai",
            "day": today,
            "calls": 2,
            "cost_usd": 0.25,
            "unpriced_calls": 1,
            "estimated_calls": 0,
        },
        {
            "provider": "gemini",
            "day": today,
            "calls": 1,
            "cost_usd": 0.1,
            "unpriced_calls": 0,
            "estimated_calls": 1,
        },
    ]


def test_report_by_project_since_today(data_dir: Path) -> None:
    rows = report(data_dir, "project", "--since", TODAY.date().isoformat())

    assert rows == [
        {"project": None, "calls": 2, "cost_usd": 1.0, "unpriced_calls": 1, "estimated_calls": 0},
        {"project": "p-1", "calls": 1, "cost_usd": 0.25, "unpriced_calls": 0, "estimated_calls": 0},
        {"project": "p-2", "calls": 1, "cost_usd": 0.1, "unpriced_calls": 0, "estimated_calls": 1},
    ]


def test_budgets_status(data_dir: Path, tmp_path: Path) -> None:
    apps = tmp_path / "costtap.yaml"
    apps.write_text(
        "budgets:\n"
        "  - {name: everything, scope: all, window: month, amount_usd: 10}\n"
        "  - {name: video-daily, scope: app, id: video, window: day, amount_usd: 1, hard: false}\n"
        "  - {name: per-user, scope: user, window: month, amount_usd: 1}\n"
    )
    month_spent = 1.85 if YESTERDAY.month == TODAY.month else 1.35

    result = cli("budgets", "--data-dir", str(data_dir), "--apps", str(apps), "--format", "json")

    assert result.returncode == 0, result.stderr
    rows = {(row["budget"], row["scope_value"]): row for row in json.loads(result.stdout)}
    everything = rows[("everything", None)]
    assert everything["spent_usd"] == pytest.approx(month_spent)
    assert everything["remaining_usd"] == pytest.approx(10 - month_spent)
    assert everything["used_percent"] == pytest.approx(month_spent * 10, abs=0.01)
    assert everything["window_start"] == window_start("month", NOW).date().isoformat()
    # Only today's video calls count in its daily window: 0.25 + 0.10.
    assert rows[("video-daily", "video")]["spent_usd"] == pytest.approx(0.35)
    assert rows[("video-daily", "video")]["hard"] is False
    # A per-user budget lists each user seen in the window.
    assert rows[("per-user", "bob")]["spent_usd"] == pytest.approx(1.10)
    assert rows[("per-user", "bob")]["remaining_usd"] == pytest.approx(-0.10)
    assert ("per-user", "cy") in rows


def test_budgets_show_calls_in_flight(tmp_path: Path) -> None:
    apps = tmp_path / "costtap.yaml"
    apps.write_text("budgets:\n  - {name: cap, amount_usd: 1, unbounded_call_factor: 4}\n")
    ledger = Ledger.in_dir(tmp_path / "data")
    budget = Budget(name="cap", amount_usd=1, unbounded_call_factor=4)
    subject = Subject("video", None, None)
    now = datetime.now(UTC)
    # In flight: one call estimated at $0.10 with a $0.30 ceiling, one at $0.05 without one.
    ledger.preflight(subject, "bounded", Decimal("0.10"), Decimal("0.30"), [budget], now)
    ledger.preflight(subject, "unbounded", Decimal("0.05"), None, [budget], now)
    ledger.close()

    result = cli(
        "budgets", "--data-dir", str(tmp_path / "data"), "--apps", str(apps), "--format", "json"
    )

    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert row["reserved_usd"] == pytest.approx(0.15)
    # $0.30, plus $0.05 times 4.
    assert row["in_flight_max_usd"] == pytest.approx(0.50)
    assert row["remaining_usd"] == pytest.approx(0.85)


def test_budgets_without_budgets_exits_1(data_dir: Path, tmp_path: Path) -> None:
    apps = tmp_path / "costtap.yaml"
    apps.write_text("apps: []\n")

    result = cli("budgets", "--data-dir", str(data_dir), "--apps", str(apps))

    assert result.returncode == 1
    assert "sets no budgets" in result.stderr


def test_thresholds_fire_again_in_next_window(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    budget = Budget(name="daily", scope="all", window="day", amount_usd=1.0, thresholds=[0.5])
    subject = Subject("video", None, None)
    day_one = datetime(2026, 11, 3, 12, tzinfo=UTC)
    day_two = day_one + timedelta(days=1)
    for request_id, moment in (("a", day_one), ("b", day_two)):
        event = UsageEvent(
            request_id=request_id,
            time=moment,
            app="video",
            provider="openai",
            endpoint="chat.completions",
            model="gpt-4o",
            units=Units(input_tokens=1),
            status=Status.SUCCESS,
            estimated=False,
        )
        ledger.insert(event, Decimal("0.60"))

    connection = ledger.db.conn
    first = crossed_thresholds(connection, [budget], subject, day_one)
    again = crossed_thresholds(connection, [budget], subject, day_one + timedelta(hours=1))
    next_day = crossed_thresholds(connection, [budget], subject, day_two)

    assert [(alert.threshold, alert.window_start.day) for alert in first] == [(0.5, 3)]
    assert again == []
    assert [(alert.threshold, alert.window_start.day) for alert in next_day] == [(0.5, 4)]

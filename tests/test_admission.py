"""Hard-budget admission on a real ledger: deny, hold, and the overspend bound."""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costtap.config.apps import Budget, load_apps
from costtap.config.store import AppsStore
from costtap.providers.base import Units
from costtap.tracker.base import Decision, PreflightCall
from costtap.tracker.budgets import Subject
from costtap.tracker.events import Status, UsageEvent
from costtap.tracker.ledger import Ledger
from costtap.tracker.local import LocalTracker

SUBJECT = Subject("billing", None, None)


def hard_budget(amount: float, factor: float = 4.0) -> Budget:
    return Budget(name="cap", amount_usd=amount, unbounded_call_factor=factor)


def event(request_id: str, units: Units | None = None) -> UsageEvent:
    return UsageEvent(
        request_id=request_id,
        time=datetime.now(UTC),
        app="billing",
        provider="openai",
        endpoint="chat.completions",
        model="gpt-4o",
        units=units or Units(input_tokens=1),
        status=Status.SUCCESS,
        estimated=False,
    )


def admit(
    ledger: Ledger, request_id: str, estimate: str, ceiling: str | None, budget: Budget
) -> str:
    admission = ledger.preflight(
        SUBJECT,
        request_id,
        Decimal(estimate),
        None if ceiling is None else Decimal(ceiling),
        [budget],
        datetime.now(UTC),
    )
    return admission.outcome


def test_admission_holds_until_ceilings_fit(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    budget = hard_budget(1.00)
    # In flight: 0.30 estimated, at most 0.70. A 0.40 call fits at the estimate
    # (0.30 + 0.40 <= 1.00) but not at the ceiling (0.70 + 0.40 > 1.00).
    assert admit(ledger, "first", "0.30", "0.70", budget) == "admit"
    assert admit(ledger, "second", "0.40", "0.40", budget) == "hold"
    # A 0.30 call fits at the ceiling too: 0.70 + 0.30 = 1.00.
    assert admit(ledger, "third", "0.30", "0.30", budget) == "admit"
    # Now 0.60 is reserved and 1.00 possible: 0.50 more cannot fit even at the estimates.
    assert admit(ledger, "fourth", "0.50", None, budget) == "deny"
    # The first call finishes at 0.35: spent 0.35, in flight at most 0.30.
    ledger.record(event("first"), Decimal("0.35"), [budget])
    assert admit(ledger, "second", "0.35", "0.35", budget) == "admit"


def test_admission_counts_unbounded_calls_at_factor(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    budget = hard_budget(1.00, factor=3)
    # No ceiling: the 0.20 estimate counts as 0.60 for the calls after it.
    assert admit(ledger, "unbounded", "0.20", None, budget) == "admit"
    assert admit(ledger, "too-big", "0.41", "0.41", budget) == "hold"
    assert admit(ledger, "fits", "0.40", "0.40", budget) == "admit"


def test_admission_skips_recorded_call(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    budget = hard_budget(1.00)
    ledger.record(event("ended-early"), Decimal("0.10"), [budget])
    assert admit(ledger, "ended-early", "0.50", "0.50", budget) == "admit"
    reserved = ledger.db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
    assert reserved == 0


@dataclass
class Flight:
    request_id: str
    estimate: Decimal
    actual: Decimal


# A call: its estimate in hundredths of a cent, whether its request bounds it, and how much
# of its worst case (ceiling, or estimate times the factor) it actually costs, in percent.
CALLS = st.tuples(
    st.integers(min_value=1, max_value=400),
    st.booleans(),
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=100, max_value=300),
)


@settings(max_examples=150, deadline=None)
@given(
    calls=st.lists(CALLS, min_size=1, max_size=40),
    finish_order=st.randoms(use_true_random=False),
    budget_cents=st.integers(min_value=1, max_value=20),
)
def test_admission_overspend_bounded_by_last_call(
    calls: list[tuple[int, bool, int, int]], finish_order: random.Random, budget_cents: int
) -> None:
    """Calls start and finish interleaved; actual costs stay within each call's worst case.

    Whatever the order, the recorded spend exceeds the budget by at most the last admitted
    call's actual cost minus its estimate.
    """
    factor = Decimal(2)
    budget = hard_budget(budget_cents / 100, factor=float(factor))
    with tempfile.TemporaryDirectory() as directory:
        ledger = Ledger.in_dir(Path(directory))
        in_flight: list[Flight] = []
        waiting: list[tuple[str, Decimal, Decimal | None, Decimal]] = []
        last_admitted: Flight | None = None
        spent = Decimal(0)

        def try_admit(
            request_id: str, estimate: Decimal, ceiling: Decimal | None, actual: Decimal
        ) -> str:
            nonlocal last_admitted
            outcome = ledger.preflight(
                SUBJECT, request_id, estimate, ceiling, [budget], datetime.now(UTC)
            ).outcome
            if outcome == "admit":
                last_admitted = Flight(request_id, estimate, actual)
                in_flight.append(last_admitted)
            return outcome

        def finish_one() -> None:
            nonlocal spent
            flight = in_flight.pop(finish_order.randrange(len(in_flight)))
            ledger.record(event(flight.request_id), flight.actual, [budget])
            spent += flight.actual
            # Held calls check again once a call has finished, in the order they came.
            for waiting_call in list(waiting):
                outcome = try_admit(*waiting_call)
                if outcome != "hold":
                    waiting.remove(waiting_call)

        for number, (hundredths, bounded, used_percent, ceiling_percent) in enumerate(calls):
            estimate = Decimal(hundredths) / 10_000
            ceiling = estimate * ceiling_percent / 100 if bounded else None
            worst = ceiling if ceiling is not None else estimate * factor
            actual = (worst * used_percent / 100).quantize(Decimal("0.0000001"))
            arguments = (f"call-{number}", estimate, ceiling, actual)
            if try_admit(*arguments) == "hold":
                waiting.append(arguments)
            if in_flight and finish_order.random() < 0.4:
                finish_one()
        while in_flight:
            finish_one()

        assert not waiting, "a held call was left waiting with no call in flight"
        allowed = Decimal(str(budget.amount_usd))
        if last_admitted is not None:
            allowed += max(last_admitted.actual - last_admitted.estimate, Decimal(0))
        assert spent <= allowed + Decimal("1e-9")


def local_tracker(tmp_path: Path, amount: float, wait: float) -> LocalTracker:
    apps = tmp_path / "apps.yaml"
    apps.write_text(
        f"budgets:\n  - {{name: cap, scope: all, amount_usd: {amount}, hard: true}}\n",
        encoding="utf-8",
    )
    store = AppsStore(load_apps(apps, "default"))
    return LocalTracker(tmp_path / "data", store, admission_wait=wait)


def chat_call(request_id: str, input_tokens: int, cap: int, ceiling_input: int) -> PreflightCall:
    return PreflightCall(
        request_id=request_id,
        app="default",
        user=None,
        project=None,
        job=None,
        provider="openai",
        model="gpt-4o",
        estimate=Units(input_tokens=input_tokens, output_tokens=cap),
        ceiling=Units(input_tokens=ceiling_input, output_tokens=cap),
    )


def test_local_tracker_admits_held_call_after_record(tmp_path: Path) -> None:
    held_apps: list[str] = []

    async def scenario() -> tuple[bool, bool, float | None]:
        tracker = local_tracker(tmp_path, amount=0.01, wait=30)
        tracker.on_held = held_apps.append
        await tracker.start()
        try:
            # At the gpt-4o list price ($2.50 and $10 per million tokens), 400 input and
            # 500 output tokens are estimated at $0.006, and a ceiling of 2,000 input tokens
            # is $0.01.
            first = await tracker.preflight(chat_call("first", 400, 500, 2000))
            # 100 input and 200 output tokens are $0.00225. That fits next to the first
            # call's estimate (0.00825) but not next to its ceiling (0.01225), so the call
            # waits until the first call is recorded.
            second = asyncio.create_task(tracker.preflight(chat_call("second", 100, 200, 100)))
            await asyncio.sleep(0.3)
            assert not second.done()
            await tracker.record(event("first", Units(input_tokens=400, output_tokens=500)))
            decision = await asyncio.wait_for(second, timeout=5)
            return first.allow, decision.allow, decision.estimated_cost_usd
        finally:
            await tracker.stop(1)

    first_allowed, second_allowed, second_estimate = asyncio.run(scenario())
    assert first_allowed and second_allowed
    assert held_apps == ["default"]
    assert second_estimate == pytest.approx(100 * 2.5e-6 + 200 * 10e-6)


def test_local_tracker_denies_held_call_after_wait(tmp_path: Path) -> None:
    async def scenario() -> Decision:
        tracker = local_tracker(tmp_path, amount=0.01, wait=0.5)
        await tracker.start()
        try:
            await tracker.preflight(chat_call("first", 400, 500, 2000))
            return await tracker.preflight(chat_call("second", 100, 200, 100))
        finally:
            await tracker.stop(1)

    decision = asyncio.run(scenario())
    assert not decision.allow
    assert decision.retry_later
    assert decision.reason == (
        "calls in flight may use the rest of budget 'cap' for all calls: $0.00 of $0.01 is "
        "spent this month, the calls in flight may cost up to $0.01, and this call is "
        "estimated at $0.00225; it waited 0.5 s for them to finish, so retry later"
    )


def test_local_tracker_denies_held_calls_at_stop(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, str | None]:
        tracker = local_tracker(tmp_path, amount=0.01, wait=30)
        await tracker.start()
        await tracker.preflight(chat_call("first", 400, 500, 2000))
        second_call = asyncio.create_task(tracker.preflight(chat_call("second", 100, 200, 100)))
        await asyncio.sleep(0.3)
        await tracker.stop(1)
        decision = await asyncio.wait_for(second_call, timeout=5)
        return decision.allow, decision.reason

    allowed, reason = asyncio.run(scenario())
    assert not allowed
    assert reason is not None
    assert reason.endswith("; costtap stopped while it waited, so retry later")


def test_local_tracker_releases_leftover_reservations(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A run that ended without recording its call left this reservation behind.
    ledger = Ledger.in_dir(tmp_path / "data")
    assert admit(ledger, "never-recorded", "0.004", None, hard_budget(0.01)) == "admit"
    ledger.close()

    async def scenario() -> Decision:
        tracker = local_tracker(tmp_path, amount=0.01, wait=0.5)
        await tracker.start()
        try:
            # $0.006 fits the budget only once the leftover $0.004 (counted at $0.016) is gone.
            return await tracker.preflight(chat_call("next", 400, 500, 2000))
        finally:
            await tracker.stop(1)

    with caplog.at_level("WARNING"):
        decision = asyncio.run(scenario())
    assert decision.allow
    assert "released 1 budget reservations" in caplog.text

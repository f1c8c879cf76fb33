"""Local mode: the embedded ledger prices, budgets and stores every call.

One thread owns the SQLite connection; hooks await its work through an executor, so the
event loop never blocks on disk. `record` returns once the event is committed, which is
before the client receives the end of its response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from costtap.config.store import AppsStore
from costtap.providers.base import Units
from costtap.tracker.alerts import AlertSender
from costtap.tracker.base import Decision, PreflightCall, TrackerError
from costtap.tracker.budgets import Admission, Subject
from costtap.tracker.events import UsageEvent
from costtap.tracker.ledger import Ledger, LedgerError
from costtap.tracker.pricing import Pricer, shipped_prices

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")

# How long a call that fits only once the calls in flight finish waits for them.
ADMISSION_WAIT_SECONDS = 30.0
# A held call also checks again this often, since expired reservations free room silently.
_HOLD_POLL_SECONDS = 1.0


class LocalTracker:
    def __init__(
        self,
        data_dir: Path,
        store: AppsStore,
        pricer: Pricer | None = None,
        price_estimates: bool = False,
        admission_wait: float = ADMISSION_WAIT_SECONDS,
    ) -> None:
        self._data_dir = data_dir
        # Price every preflight estimate, because `tracker serve` returns the price. The proxy
        # needs it only when budgets apply.
        self._price_estimates = price_estimates
        # How long a call held by calls in flight waits for them before it is denied.
        self._admission_wait = admission_wait
        self._held_calls = asyncio.Lock()
        # Set, then replaced, each time a call settles, to wake the held call waiting first.
        self._settled = asyncio.Event()
        self._stopping = False
        self._store = store
        self.pricer = pricer or Pricer(lambda: store.current.config.prices)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="costtap-ledger")
        self._ledger: Ledger | None = None
        self._alerts = AlertSender()
        self.written = 0
        self.failed = 0
        # Called with the app of each call held by calls in flight near a hard budget's end.
        self.on_held: Callable[[str], None] | None = None
        # Called with (provider, model) for each recorded call that has no price.
        self.on_unpriced: Callable[[str, str], None] | None = None

    async def start(self) -> None:
        try:
            # A broken price overlay fails here, at start, not on the first call.
            shipped_prices()
            await self._run(self._open)
        except (LedgerError, ValueError) as error:
            raise TrackerError(str(error)) from error
        await self._alerts.start()

    def _open(self) -> None:
        self._ledger = Ledger.in_dir(self._data_dir)
        logger.info("ledger open at %s", self._ledger.path)
        released = self._ledger.release_reservations()
        if released:
            logger.warning(
                "released %d budget reservations of calls that a previous run never recorded",
                released,
            )

    async def preflight(self, call: PreflightCall) -> Decision:
        budgets = self._store.current.config.budgets
        if not budgets and not self._price_estimates:
            return Decision(True, call.request_id)
        estimate = call.estimate
        if call.output_is_default:
            default = self.pricer.default_output_tokens(call.provider, call.model)
            if default is not None:
                estimate = replace(estimate, output_tokens=default)
        now = datetime.now(UTC)
        cost = self._price(call.provider, call.model, estimate, now)
        estimated = float(cost) if cost is not None else None
        if not budgets:
            return Decision(True, call.request_id, estimated_cost_usd=estimated)
        ceiling = (
            self._price(call.provider, call.model, call.ceiling, now)
            if call.ceiling is not None
            else None
        )
        try:
            admission = await self._admit(call, cost, ceiling)
        except LedgerError as error:
            logger.error("[%s app=%s] budget check failed: %s", call.request_id, call.app, error)
            allow = call.unreachable_policy == "allow"
            return Decision(
                allow,
                call.request_id,
                None if allow else "budget check failed",
                decided_by="policy",
            )
        return Decision(
            admission.outcome == "admit",
            call.request_id,
            admission.reason,
            estimated,
            retry_later=admission.retry_later,
        )

    async def _admit(
        self, call: PreflightCall, cost: Decimal | None, ceiling: Decimal | None
    ) -> Admission:
        """Check the budgets; a held call waits for calls in flight to finish, then checks again."""
        subject = Subject(call.app, call.user, call.project)

        def check() -> Admission:
            return self._require_ledger().preflight(
                subject,
                call.request_id,
                cost,
                ceiling,
                self._store.current.config.budgets,
                datetime.now(UTC),
            )

        admission = await self._run(check)
        if admission.outcome != "hold":
            return admission
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.on_held is not None:
            self.on_held(call.app)
        logger.info(
            "[%s app=%s] waiting for calls in flight: %s",
            call.request_id,
            call.app,
            admission.reason,
        )
        # Held calls check again one at a time, in the order they came.
        # NOTE: a held call whose client has left keeps its place until admitted or timed out.
        async with self._held_calls:
            while True:
                if self._stopping:
                    reason = f"{admission.reason}; costtap stopped while it waited, so retry later"
                    return Admission("deny", reason, retry_later=True)
                settled = self._settled
                admission = await self._run(check)
                waited = loop.time() - started
                if admission.outcome != "hold":
                    logger.info(
                        "[%s app=%s] %s after waiting %.1f s",
                        call.request_id,
                        call.app,
                        "admitted" if admission.outcome == "admit" else "denied",
                        waited,
                    )
                    return admission
                remaining = self._admission_wait - waited
                if remaining <= 0:
                    reason = (
                        f"{admission.reason}; it waited {self._admission_wait:g} s for them to "
                        "finish, so retry later"
                    )
                    return Admission("deny", reason, retry_later=True)
                # Expired reservations free room without any record, hence the poll.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled.wait(), min(remaining, _HOLD_POLL_SECONDS))

    async def record(self, event: UsageEvent) -> None:
        await self.record_and_price(event)

    async def record_and_price(self, event: UsageEvent) -> tuple[bool, Decimal | None]:
        """Store the event; return whether it was new, and its cost (None when unpriced)."""
        cost = self._price(event.provider, event.model, event.units, event.time)
        budgets = self._store.current.config.budgets
        try:
            inserted, alerts = await self._run(
                lambda: self._require_ledger().record(event, cost, budgets)
            )
        except LedgerError as error:
            self._wake_held_calls()
            # NOTE: a failed ledger write is logged, not retried.
            self.failed += 1
            logger.error("[%s app=%s] %s", event.request_id, event.app, error)
            return False, cost
        self._wake_held_calls()
        if not inserted:
            logger.info("[%s app=%s] duplicate record ignored", event.request_id, event.app)
            return False, cost
        if cost is None and self.on_unpriced is not None:
            self.on_unpriced(event.provider, event.model or "<unknown model>")
        self.written += 1
        logger.debug(
            "[%s app=%s] recorded %s %s units=%s cost_usd=%s",
            event.request_id,
            event.app,
            event.endpoint,
            event.model,
            event.units.to_dict(),
            cost,
        )
        for alert in alerts:
            self._alerts.fire(alert, self._store.current.config.alert_webhook)
        return True, cost

    async def upsert_user(self, external_id: str, email: str | None, full_name: str | None) -> None:
        await self._run(lambda: self._require_ledger().upsert_user(external_id, email, full_name))

    async def upsert_project(
        self, external_id: str, source_app: str | None, name: str | None, workspace_id: str | None
    ) -> None:
        await self._run(
            lambda: self._require_ledger().upsert_project(
                external_id, source_app, name, workspace_id
            )
        )

    def _wake_held_calls(self) -> None:
        self._settled.set()
        self._settled = asyncio.Event()

    def readiness(self) -> str | None:
        return None if self._ledger is not None else "ledger not open"

    def pending_records(self) -> int:
        return 0

    def stop_admitting(self) -> None:
        self._stopping = True
        self._wake_held_calls()

    async def stop(self, flush_seconds: float) -> None:
        # Held calls are denied rather than left to check a closed ledger.
        self.stop_admitting()
        await self._alerts.stop(flush_seconds)
        if self._ledger is not None:
            await self._run(self._require_ledger().close)
            logger.info(
                "ledger closed after %d events written, %d failed", self.written, self.failed
            )
        self._executor.shutdown(wait=True)

    def _price(
        self, provider: str, model: str | None, units: Units, when: datetime
    ) -> Decimal | None:
        """Price usage; a pricing failure leaves the call unpriced, never unrecorded."""
        try:
            return self.pricer.price(provider, model, units, when)
        except Exception:
            logger.exception(
                "pricing %s of %s failed; the call is recorded unpriced", model, provider
            )
            return None

    def _require_ledger(self) -> Ledger:
        if self._ledger is None:
            raise LedgerError("the ledger is not open")
        return self._ledger

    async def _run(self, function: Callable[[], _Result]) -> _Result:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

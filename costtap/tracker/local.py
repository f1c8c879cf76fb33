"""Local mode: the embedded ledger prices, budgets and stores every call.

One thread owns the SQLite connection; hooks await its work through an executor, so the
event loop never blocks on disk. `record` returns once the event is committed, which is
before the client receives the end of its response.
"""

from __future__ import annotations

import asyncio
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
from costtap.tracker.budgets import Subject
from costtap.tracker.events import UsageEvent
from costtap.tracker.ledger import Ledger, LedgerError
from costtap.tracker.pricing import Pricer, shipped_prices

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")


class LocalTracker:
    def __init__(
        self,
        data_dir: Path,
        store: AppsStore,
        pricer: Pricer | None = None,
        price_estimates: bool = False,
    ) -> None:
        self._data_dir = data_dir
        # Price every preflight estimate, because `tracker serve` returns the price. The proxy
        # needs it only when budgets apply.
        self._price_estimates = price_estimates
        self._store = store
        self.pricer = pricer or Pricer(lambda: store.current.config.prices)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="costtap-ledger")
        self._ledger: Ledger | None = None
        self._alerts = AlertSender()
        self.written = 0
        self.failed = 0
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

    async def preflight(self, call: PreflightCall) -> Decision:
        budgets = self._store.current.config.budgets
        if not budgets and not self._price_estimates:
            return Decision(True, call.request_id)
        estimate = call.estimate
        if call.output_is_default:
            default = self.pricer.default_output_tokens(call.provider, call.model)
            if default is not None:
                estimate = replace(estimate, output_tokens=default)
        cost = self._price(call.provider, call.model, estimate, datetime.now(UTC))
        estimated = float(cost) if cost is not None else None
        if not budgets:
            return Decision(True, call.request_id, estimated_cost_usd=estimated)
        subject = Subject(call.app, call.user, call.project)
        try:
            reason = await self._run(
                lambda: self._require_ledger().preflight(
                    subject, call.request_id, cost, budgets, datetime.now(UTC)
                )
            )
        except LedgerError as error:
            logger.error("[%s app=%s] budget check failed: %s", call.request_id, call.app, error)
            allow = call.unreachable_policy == "allow"
            return Decision(
                allow,
                call.request_id,
                None if allow else "budget check failed",
                decided_by="policy",
            )
        return Decision(reason is None, call.request_id, reason, estimated)

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
            # NOTE: a failed ledger write is logged, not retried.
            self.failed += 1
            logger.error("[%s app=%s] %s", event.request_id, event.app, error)
            return False, cost
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

    def readiness(self) -> str | None:
        return None if self._ledger is not None else "ledger not open"

    def pending_records(self) -> int:
        return 0

    async def stop(self, flush_seconds: float) -> None:
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

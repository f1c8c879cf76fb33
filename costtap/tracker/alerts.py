"""Budget alerts: a warning in the log and, when configured, a JSON webhook.

The ledger decides that an alert fires (once per budget, window and threshold); this module
only delivers it. Webhooks are posted in the background and retried a few times, so a slow
receiver never delays a call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from costtap.tracker.budgets import Alert, format_usd

logger = logging.getLogger(__name__)

WEBHOOK_ATTEMPTS = 4
WEBHOOK_TIMEOUT = 10.0
WEBHOOK_FIRST_BACKOFF = 0.5


def alert_payload(alert: Alert) -> dict[str, Any]:
    budget = alert.budget
    return {
        "type": "budget.threshold_crossed",
        "budget": budget.name,
        "scope": budget.scope,
        "scope_value": alert.scope_value,
        "window": budget.window,
        "window_start": alert.window_start.isoformat().replace("+00:00", "Z"),
        "threshold": alert.threshold,
        "spent_usd": round(alert.spent_usd, 6),
        "amount_usd": budget.amount_usd,
        "hard": budget.hard,
    }


class AlertSender:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._deliver_forever(), name="costtap-alert-webhook")

    def fire(self, alert: Alert, webhook: str | None) -> None:
        payload = alert_payload(alert)
        scope = (
            "all calls"
            if alert.scope_value is None
            else f"{alert.budget.scope} {alert.scope_value}"
        )
        logger.warning(
            "budget %r for %s crossed %d%% of %s this %s: %s spent",
            alert.budget.name,
            scope,
            round(alert.threshold * 100),
            format_usd(alert.budget.amount_usd),
            alert.budget.window,
            format_usd(alert.spent_usd),
        )
        if webhook is not None:
            self._queue.put_nowait((webhook, payload))

    async def stop(self, flush_seconds: float) -> None:
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout=flush_seconds)
        except TimeoutError:
            logger.warning(
                "stopping with %d budget alerts not delivered to the webhook", self._queue.qsize()
            )
        self._task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _deliver_forever(self) -> None:
        while True:
            url, payload = await self._queue.get()
            try:
                await self._deliver(url, payload)
            finally:
                self._queue.task_done()

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
            )
        delay = WEBHOOK_FIRST_BACKOFF
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                async with self._session.post(url, json=payload) as response:
                    if response.status < 300:
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                problem = f"{type(error).__name__}: {error}"
            if attempt < WEBHOOK_ATTEMPTS:
                logger.warning(
                    "alert webhook attempt %d failed (%s); retrying in %.1f s",
                    attempt,
                    problem,
                    delay,
                )
                await asyncio.sleep(delay)
                delay *= 2
            else:
                logger.error(
                    "alert webhook failed after %d attempts (%s); budget %r",
                    attempt,
                    problem,
                    payload["budget"],
                )

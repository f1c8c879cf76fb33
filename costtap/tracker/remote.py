"""Remote mode: the central cost-tracker API, reached through a durable outbox.

Preflight is a direct call with a short timeout. When the tracker cannot be reached, the
app's policy decides. Records are committed to the outbox first, then a background sender posts
them several at a time and retries timeouts, connection errors, 408, 429 and 5xx with
exponential backoff and jitter. A 401 keeps the records waiting and makes readiness fail
until the key works. The API key is sent in `X-API-Key` and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from costtap.config.tracker import TrackerSettings
from costtap.tracker.base import Decision, PreflightCall, TrackerError
from costtap.tracker.events import UsageEvent
from costtap.tracker.outbox import Outbox, OutboxError, PendingRecord

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")

SEND_CONCURRENCY = 4
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 60.0
# How long the sender waits for work when nothing is due, in seconds.
IDLE_WAIT = 1.0
HEALTH_INTERVAL = 15.0
RETRYABLE_STATUSES = frozenset({408, 429})


def preflight_payload(call: PreflightCall) -> dict[str, Any]:
    return {
        "user_external_id": call.user,
        "project_external_id": call.project,
        "job_external_id": call.job,
        "source_app": call.app,
        "model": call.model,
        "estimated_units": call.estimate.to_dict(),
        # costtap's own field, for trackers that price by provider; others ignore it.
        "provider": call.provider,
    }


def record_payload(event: UsageEvent) -> dict[str, Any]:
    """Build the `/usage/record` body: the contract's fields, then costtap's own.

    The extra fields (`provider`, `endpoint`, `time`, `ttfb_ms`, `estimated`) let a
    costtap tracker keep a full ledger; a tracker that does not know them ignores them.
    """
    return {
        "request_id": event.request_id,
        "user_external_id": event.user,
        "project_external_id": event.project,
        "job_external_id": event.job,
        "source_app": event.app,
        "model": event.model,
        "units": event.units.to_dict(),
        "latency_ms": event.latency_ms,
        "status": str(event.status),
        "provider": event.provider,
        "endpoint": event.endpoint,
        "time": event.time.isoformat().replace("+00:00", "Z"),
        "ttfb_ms": event.ttfb_ms,
        "estimated": event.estimated,
    }


def backoff_seconds(attempts: int) -> float:
    """Return the delay before the next attempt: exponential, capped, with full jitter."""
    ceiling = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(attempts, 16))
    return random.uniform(ceiling / 2, ceiling)


class RemoteTracker:
    def __init__(self, settings: TrackerSettings, data_dir: Path) -> None:
        self._settings = settings
        self._data_dir = data_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="costtap-outbox")
        self._outbox: Outbox | None = None
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending = 0
        self._auth_failed = False
        self._unreachable_since: float | None = None
        self._last_problem: str | None = None
        self._upserted: set[tuple[str, str]] = set()
        self._upserts: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._stopping = False
        self.delivered = 0

    async def start(self) -> None:
        try:
            await self._run(self._open)
        except OutboxError as error:
            raise TrackerError(str(error)) from error
        self._session = aiohttp.ClientSession(headers={"X-API-Key": self._settings.api_key})
        self._tasks = [
            asyncio.create_task(self._send_forever(), name="costtap-outbox-sender"),
            asyncio.create_task(self._check_health_forever(), name="costtap-tracker-health"),
            asyncio.create_task(self._upsert_forever(), name="costtap-tracker-upserts"),
        ]
        logger.info(
            "remote mode: tracker %s, key %s, preflight timeout %.1f s, %d records waiting in %s",
            self._settings.base_url,
            self._settings.hidden_key,
            self._settings.preflight_timeout,
            self._pending,
            self._data_dir / "outbox.db",
        )

    def _open(self) -> None:
        self._outbox = Outbox.in_dir(self._data_dir)
        self._pending = self._outbox.pending_count()

    async def preflight(self, call: PreflightCall) -> Decision:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self._settings.preflight_timeout)
        try:
            async with self._session.post(
                self._settings.url("preflight"), json=preflight_payload(call), timeout=timeout
            ) as response:
                if response.status == 200:
                    body = await response.json(content_type=None)
                    return _decision_from(body, call)
                problem = f"HTTP {response.status}"
                if response.status == 401:
                    self._note_auth_failure()
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        allow = call.unreachable_policy == "allow"
        logger.warning(
            "[%s app=%s] preflight failed (%s); app policy %s",
            call.request_id,
            call.app,
            problem,
            "allows the call" if allow else "denies the call",
        )
        reason = (
            None
            if allow
            else f"the cost tracker could not be reached ({problem}) and this app's policy is deny"
        )
        return Decision(allow, call.request_id, reason, decided_by="policy")

    async def record(self, event: UsageEvent) -> None:
        payload = record_payload(event)
        try:
            added = await self._run(lambda: self._require_outbox().add(event.request_id, payload))
        except OutboxError as error:
            logger.error("[%s app=%s] record lost: %s", event.request_id, event.app, error)
            return
        if added:
            self._pending += 1
        self._wake.set()
        self._queue_upserts(event)

    def readiness(self) -> str | None:
        if self._auth_failed:
            return (
                "the tracker rejected COST_TRACKER_API_KEY (401); check the key and restart costtap"
            )
        if self._unreachable_since is not None:
            return f"tracker unreachable for {time.monotonic() - self._unreachable_since:.0f} s: {self._last_problem}"
        return None

    def pending_records(self) -> int:
        return self._pending

    def stop_admitting(self) -> None:
        # The tracker decides at once: no call waits for admission here.
        return None

    async def stop(self, flush_seconds: float) -> None:
        deadline = time.monotonic() + flush_seconds
        while self._pending and time.monotonic() < deadline and not self._auth_failed:
            self._wake.set()
            await asyncio.sleep(0.05)
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._outbox is not None:
            await self._run(self._outbox.close)
        self._executor.shutdown(wait=True)
        if self._pending:
            logger.warning(
                "stopping with %d records in the outbox; they are sent at the next start",
                self._pending,
            )
        logger.info("outbox closed after %d records delivered", self.delivered)

    # The sender.

    async def _send_forever(self) -> None:
        while not self._stopping:
            try:
                batch = await self._run(lambda: self._require_outbox().due(SEND_CONCURRENCY * 4))
            except OutboxError as error:
                logger.error("cannot read the outbox: %s", error)
                await asyncio.sleep(IDLE_WAIT)
                continue
            if not batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=IDLE_WAIT)
                continue
            limit = asyncio.Semaphore(SEND_CONCURRENCY)
            await asyncio.gather(*(self._send_one(record, limit) for record in batch))

    async def _send_one(self, record: PendingRecord, limit: asyncio.Semaphore) -> None:
        assert self._session is not None
        async with limit:
            outcome = await self._post(record)
        try:
            if outcome is None:
                await self._run(lambda: self._require_outbox().delivered(record.request_id))
                self._pending = max(0, self._pending - 1)
                self.delivered += 1
                self._note_reachable()
            elif outcome.startswith("dead:"):
                reason = outcome.removeprefix("dead:")
                await self._run(
                    lambda: self._require_outbox().move_to_dead_letters(record.request_id, reason)
                )
                self._pending = max(0, self._pending - 1)
                logger.error(
                    "[%s] record rejected by the tracker, moved to dead letters: %s",
                    record.request_id,
                    reason,
                )
            else:
                delay = backoff_seconds(record.attempts)
                next_at = time.time() + delay
                await self._run(
                    lambda: self._require_outbox().retry_later(record.request_id, outcome, next_at)
                )
                if record.attempts == 0 or record.attempts % 10 == 0:
                    logger.warning(
                        "[%s] record delivery failed (%s), attempt %d; retrying in %.1f s",
                        record.request_id,
                        outcome,
                        record.attempts + 1,
                        delay,
                    )
        except OutboxError as error:
            logger.error("[%s] cannot update the outbox: %s", record.request_id, error)

    async def _post(self, record: PendingRecord) -> str | None:
        """Post one record; return None on success, "dead:REASON" or a retryable problem."""
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self._settings.record_timeout)
        try:
            async with self._session.post(
                self._settings.url("usage/record"), json=record.payload, timeout=timeout
            ) as response:
                if response.status < 300:
                    if self._auth_failed:
                        logger.info("the tracker accepts the API key again")
                    self._auth_failed = False
                    return None
                if response.status == 401:
                    self._note_auth_failure()
                    return "HTTP 401"
                if response.status in RETRYABLE_STATUSES or response.status >= 500:
                    self._note_unreachable(f"HTTP {response.status}")
                    return f"HTTP {response.status}"
                text = (await response.text())[:300]
                return f"dead:HTTP {response.status}: {text}"
        except (aiohttp.ClientError, TimeoutError) as error:
            problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            self._note_unreachable(problem)
            return problem

    # Health, users and projects.

    async def _check_health_forever(self) -> None:
        assert self._session is not None
        while not self._stopping:
            try:
                async with self._session.get(
                    self._settings.url("health"), timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    if response.status == 200:
                        self._note_reachable()
                    elif response.status == 404:
                        self._note_unreachable(
                            f"{self._settings.url('health')} answered 404: check that COST_TRACKER_BASE_URL "
                            "is the tracker's base URL (for costtap tracker serve, http://HOST:PORT with no path)"
                        )
                    else:
                        self._note_unreachable(f"health HTTP {response.status}")
            except (aiohttp.ClientError, TimeoutError) as error:
                self._note_unreachable(f"health {type(error).__name__}: {error}")
            await asyncio.sleep(HEALTH_INTERVAL)

    def _queue_upserts(self, event: UsageEvent) -> None:
        extra = event.extra
        if event.user and ("user_email" in extra or "user_name" in extra):
            key = ("user", event.user)
            if key not in self._upserted:
                self._upserted.add(key)
                body = {
                    "external_id": event.user,
                    "email": extra.get("user_email"),
                    "full_name": extra.get("user_name"),
                }
                self._upserts.put_nowait(("users/upsert", body))
        if event.project and "project_name" in extra:
            key = ("project", event.project)
            if key not in self._upserted:
                self._upserted.add(key)
                body = {
                    "external_id": event.project,
                    "source_app": event.app,
                    "name": extra["project_name"],
                }
                self._upserts.put_nowait(("projects/upsert", body))

    async def _upsert_forever(self) -> None:
        assert self._session is not None
        while not self._stopping:
            endpoint, body = await self._upserts.get()
            for attempt in range(1, 4):
                try:
                    async with self._session.post(
                        self._settings.url(endpoint),
                        json=body,
                        timeout=aiohttp.ClientTimeout(total=10),
                    ) as response:
                        if response.status < 300:
                            break
                        problem = f"HTTP {response.status}"
                except (aiohttp.ClientError, TimeoutError) as error:
                    problem = type(error).__name__
                if attempt == 3:
                    logger.warning(
                        "%s for %s failed after %d attempts (%s)",
                        endpoint,
                        body["external_id"],
                        attempt,
                        problem,
                    )
                else:
                    await asyncio.sleep(backoff_seconds(attempt))

    def _note_auth_failure(self) -> None:
        if not self._auth_failed:
            logger.error(
                "the tracker at %s rejected the API key (401): check COST_TRACKER_API_KEY (key %s) "
                "and that it belongs to this tracker; records wait in the outbox",
                self._settings.base_url,
                self._settings.hidden_key,
            )
        self._auth_failed = True

    def _note_unreachable(self, problem: str) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            logger.warning("tracker %s unreachable: %s", self._settings.base_url, problem)
        self._last_problem = problem

    def _note_reachable(self) -> None:
        if self._unreachable_since is not None:
            logger.info("tracker %s reachable again", self._settings.base_url)
        self._unreachable_since = None
        self._last_problem = None

    def _require_outbox(self) -> Outbox:
        if self._outbox is None:
            raise OutboxError("the outbox is not open")
        return self._outbox

    async def _run(self, function: Callable[[], _Result]) -> _Result:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)


def _decision_from(body: Any, call: PreflightCall) -> Decision:
    if not isinstance(body, dict) or not isinstance(body.get("allow"), bool):
        allow = call.unreachable_policy == "allow"
        reason = (
            None
            if allow
            else "the cost tracker sent an invalid preflight response and this app's policy is deny"
        )
        logger.warning(
            "[%s app=%s] invalid preflight response from the tracker", call.request_id, call.app
        )
        return Decision(allow, call.request_id, reason, decided_by="policy")
    request_id = body.get("request_id")
    cost = body.get("estimated_cost_usd")
    return Decision(
        allow=body["allow"],
        request_id=request_id if isinstance(request_id, str) and request_id else call.request_id,
        reason=body.get("deny_reason") if isinstance(body.get("deny_reason"), str) else None,
        estimated_cost_usd=float(cost)
        if isinstance(cost, int | float) and not isinstance(cost, bool)
        else None,
        # costtap's own tracker adds this to a denial that a later retry may pass.
        retry_later=body.get("retry_later") is True,
    )

"""`costtap tracker serve`: the cost-tracker API over the local ledger.

Several sidecars can share one ledger through it, and remote mode is tested against it.
Every endpoint but `/health` needs an `X-API-Key` from `COSTTAP_TRACKER_API_KEYS`, compared
in constant time. `/usage/record` deduplicates on `request_id`: a record sent twice is
stored once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from costtap.config.settings import Address
from costtap.config.store import AppsStore
from costtap.providers.base import Units
from costtap.tracker.base import PreflightCall
from costtap.tracker.events import Status, UsageEvent, new_request_id
from costtap.tracker.local import LocalTracker

logger = logging.getLogger(__name__)

_UNITS_FIELDS = set(Units.__dataclass_fields__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PreflightBody(_Body):
    user_external_id: str | None = None
    project_external_id: str | None = None
    job_external_id: str | None = None
    source_app: str = Field(min_length=1)
    model: str | None = None
    estimated_units: dict[str, int | float] = Field(default_factory=dict)
    provider: str | None = None


class RecordBody(_Body):
    request_id: str | None = None
    user_external_id: str | None = None
    project_external_id: str | None = None
    job_external_id: str | None = None
    source_app: str = Field(min_length=1)
    model: str | None = None
    units: dict[str, int | float] = Field(default_factory=dict)
    latency_ms: int | None = None
    status: Literal["success", "error", "cancelled", "denied"] = "success"
    provider: str | None = None
    endpoint: str | None = None
    time: datetime | None = None
    ttfb_ms: int | None = None
    estimated: bool = False


class UserBody(_Body):
    external_id: str = Field(min_length=1)
    email: str | None = None
    full_name: str | None = None


class ProjectBody(_Body):
    external_id: str = Field(min_length=1)
    source_app: str | None = None
    name: str | None = None
    workspace_id: str | None = None


def _units(values: dict[str, int | float]) -> Units:
    unknown = set(values) - _UNITS_FIELDS
    if unknown:
        raise ValueError(f"unknown units: {', '.join(sorted(unknown))}")
    return Units.from_dict({name: value for name, value in values.items() if value})


class TrackerServer:
    def __init__(self, tracker: LocalTracker, store: AppsStore, api_keys: list[str]) -> None:
        self._tracker = tracker
        self._store = store
        self._api_keys = [key.encode() for key in api_keys]

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate], client_max_size=1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_post("/preflight", self._preflight)
        app.router.add_post("/usage/record", self._record)
        app.router.add_post("/users/upsert", self._upsert_user)
        app.router.add_post("/projects/upsert", self._upsert_project)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/health":
            response: web.StreamResponse = await handler(request)
            return response
        presented_key = request.headers.get("X-API-Key", "").encode()
        if not any(hmac.compare_digest(presented_key, key) for key in self._api_keys):
            return web.json_response({"detail": "invalid or missing X-API-Key"}, status=401)
        response = await handler(request)
        return response

    async def _health(self, request: web.Request) -> web.Response:
        ready = self._tracker.readiness() is None
        return web.json_response(
            {"status": "ok" if ready else "error", "db": "ok" if ready else "error"}
        )

    async def _preflight(self, request: web.Request) -> web.Response:
        body = await _parse(request, PreflightBody)
        try:
            estimate = _units(body.estimated_units)
        except ValueError as error:
            raise web.HTTPUnprocessableEntity(text=str(error)) from error
        call = PreflightCall(
            request_id=new_request_id(),
            app=body.source_app,
            user=body.user_external_id,
            project=body.project_external_id,
            job=body.job_external_id,
            provider=body.provider or "",
            model=body.model,
            estimate=estimate,
        )
        decision = await self._tracker.preflight(call)
        answer: dict[str, Any] = {
            "allow": decision.allow,
            "estimated_cost_usd": decision.estimated_cost_usd,
            "request_id": decision.request_id,
        }
        if not decision.allow:
            answer["deny_reason"] = decision.reason
        if decision.retry_later:
            # Not in the tracker API: a costtap sidecar lets the client retry such a denial.
            answer["retry_later"] = True
        return web.json_response(answer)

    async def _record(self, request: web.Request) -> web.Response:
        body = await _parse(request, RecordBody)
        try:
            units = _units(body.units)
        except ValueError as error:
            raise web.HTTPUnprocessableEntity(text=str(error)) from error
        event = UsageEvent(
            request_id=body.request_id or new_request_id(),
            time=body.time.astimezone(UTC) if body.time else datetime.now(UTC),
            app=body.source_app,
            provider=body.provider or "",
            endpoint=body.endpoint or "",
            model=body.model,
            units=units,
            status=Status(body.status),
            estimated=body.estimated,
            latency_ms=body.latency_ms,
            ttfb_ms=body.ttfb_ms,
            user=body.user_external_id,
            project=body.project_external_id,
            job=body.job_external_id,
        )
        inserted, cost = await self._tracker.record_and_price(event)
        return web.json_response(
            {
                "event_id": event.request_id,
                "cost_usd": float(cost) if cost is not None else None,
                "duplicate": not inserted,
            }
        )

    async def _upsert_user(self, request: web.Request) -> web.Response:
        body = await _parse(request, UserBody)
        await self._tracker.upsert_user(body.external_id, body.email, body.full_name)
        return web.json_response({"external_id": body.external_id})

    async def _upsert_project(self, request: web.Request) -> web.Response:
        body = await _parse(request, ProjectBody)
        await self._tracker.upsert_project(
            body.external_id, body.source_app, body.name, body.workspace_id
        )
        return web.json_response({"external_id": body.external_id})


async def _parse[Model: BaseModel](request: web.Request, model: type[Model]) -> Model:
    try:
        return model.model_validate(await request.json())
    except ValueError as error:
        # pydantic's ValidationError is a ValueError; so is invalid JSON.
        detail = (
            error.errors()[0]["msg"]
            if isinstance(error, ValidationError)
            else "body is not valid JSON"
        )
        raise web.HTTPUnprocessableEntity(text=f"invalid {request.path} body: {detail}") from error


async def run_tracker_server(
    listen: Address, tracker: LocalTracker, store: AppsStore, api_keys: list[str]
) -> None:
    """Serve until SIGINT or SIGTERM. Raises OSError when the address cannot be bound."""
    await tracker.start()
    runner = web.AppRunner(TrackerServer(tracker, store, api_keys).application(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, listen.host, listen.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else listen.port
        logger.info(
            "costtap tracker listening on http://%s:%d with %d API keys",
            listen.host,
            port,
            len(api_keys),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        loop.add_signal_handler(signal.SIGHUP, store.reload, "SIGHUP")
        watcher = asyncio.create_task(store.watch(), name="apps-file-watcher")
        await stop.wait()
        watcher.cancel()
        logger.info("costtap tracker stopping")
    finally:
        await runner.cleanup()
        await tracker.stop(flush_seconds=5)

"""Admin endpoints on their own port: `/healthz`, `/readyz` and Prometheus `/metrics`.

Served by aiohttp on the proxy's event loop. They read counters only and never touch flows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from costtap.config.settings import Address

logger = logging.getLogger(__name__)


class Metrics:
    """The counters costtap exports, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "costtap_calls",
            "Metered calls by provider, endpoint and status.",
            ["provider", "endpoint", "status"],
            registry=self.registry,
        )
        self.estimated = Counter(
            "costtap_estimated_calls",
            "Metered calls whose units are estimates because the provider reported no usage.",
            ["provider", "endpoint"],
            registry=self.registry,
        )
        self.free_calls = Counter(
            "costtap_free_calls",
            "Calls to free provider endpoints (token counting, moderation, listings), not metered.",
            ["provider", "endpoint"],
            registry=self.registry,
        )
        self.identity_rejected = Counter(
            "costtap_identity_rejected",
            "Identity values rejected as too long or containing control characters.",
            ["app", "field"],
            registry=self.registry,
        )
        self.denied = Counter(
            "costtap_denied_calls",
            "Calls denied before they left: a hard budget would be exceeded, or the tracker was unreachable under a deny policy.",
            ["provider", "app"],
            registry=self.registry,
        )
        self.budget_held = Counter(
            "costtap_budget_held_calls",
            "Calls that waited for calls in flight because a hard budget could not fit them all at their ceilings.",
            ["app"],
            registry=self.registry,
        )
        self.outbox_pending = Gauge(
            "costtap_outbox_pending",
            "Records waiting in the outbox for the tracker (remote mode).",
            registry=self.registry,
        )
        self.unpriced = Counter(
            "costtap_unpriced_calls",
            "Recorded calls without a price for their model; their cost is null in the ledger.",
            ["provider", "model"],
            registry=self.registry,
        )
        self.parse_failures = Counter(
            "costtap_parse_failures",
            "Responses costtap could not decode or parse; their usage was estimated.",
            ["provider", "endpoint"],
            registry=self.registry,
        )


class AdminServer:
    def __init__(
        self, address: Address, metrics: Metrics, is_ready: Callable[[], str | None]
    ) -> None:
        self._address = address
        self._metrics = metrics
        # Returns None when ready, else the reason it is not.
        self._is_ready = is_ready
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen; raise OSError when the address cannot be bound."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._address.host, self._address.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._address.port
        logger.info(
            "admin endpoints on http://%s:%d (/healthz, /readyz, /metrics)",
            self._address.host,
            self.port,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = self._is_ready()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

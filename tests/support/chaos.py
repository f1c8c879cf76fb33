"""A reverse proxy on 127.0.0.1 that makes a tracker fail on purpose, reproducibly.

Each request is forwarded, failed before forwarding, or forwarded and then failed, as the
chosen mode and a seeded random generator decide. "Forwarded then failed" is the hard case
for idempotency: the tracker stored the record but its client saw an error and will retry.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web


@dataclass
class ChaosSettings:
    # Probability that a /usage/record request fails with 500 before reaching the tracker.
    fail_before: float = 0.0
    # Probability that it is forwarded, and its response replaced with 500.
    fail_after: float = 0.0
    # Probability that it is held longer than the client's timeout.
    stall: float = 0.0
    stall_seconds: float = 12.0
    # Seconds every /preflight is held before it is forwarded.
    preflight_delay: float = 0.0
    seed: int = 20261204
    counts: dict[str, int] = field(default_factory=dict)


class ChaosProxy:
    def __init__(self, target: str, settings: ChaosSettings) -> None:
        self.target = target.rstrip("/")
        self.settings = settings
        self._random = random.Random(settings.seed)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="chaos-proxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ChaosProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _count(self, name: str) -> None:
        self.settings.counts[name] = self.settings.counts.get(name, 0) + 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        settings = self.settings
        body = await request.read()
        is_record = request.path.endswith("/usage/record")
        if request.path.endswith("/preflight") and settings.preflight_delay:
            await asyncio.sleep(settings.preflight_delay)
        if is_record:
            roll = self._random.random()
            if roll < settings.fail_before:
                self._count("fail_before")
                return web.json_response({"detail": "chaos before"}, status=500)
            if roll < settings.fail_before + settings.stall:
                self._count("stall")
                await asyncio.sleep(settings.stall_seconds)
        assert self._session is not None
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("x-api-key", "content-type")
        }
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
        if is_record and self._random.random() < settings.fail_after:
            self._count("fail_after")
            return web.json_response({"detail": "chaos after"}, status=500)
        self._count("forwarded")
        return web.Response(body=payload, status=status, content_type="application/json")

"""A TLS HTTP server on 127.0.0.1 that plays a provider, replaying scripted replies.

It runs its own event loop in a thread, records every request it receives, and writes each
reply chunk by chunk so that streaming can be observed from the client side.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Reply:
    chunks: list[bytes]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to wait after the first chunk before sending the rest.
    pause_after_first: float = 0.0
    # Seconds to wait before sending the status line and headers.
    pause_before_headers: float = 0.0


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeUpstream:
    """Serve `responder(request)` for every request, over TLS, on a free loopback port."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self._ssl_context = ssl_context
        self.responder: Callable[[ReceivedRequest], Reply] = lambda request: Reply([b"{}"])
        self.received: list[ReceivedRequest] = []
        # time.monotonic() just before the second chunk of each reply was written.
        self.second_chunk_times: list[float] = []
        # (direction, text) pairs, direction "client" or "server", for WebSocket upgrades.
        self.websocket_script: list[tuple[str, str]] = []
        self.websocket_received: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-upstream", daemon=True
        )

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("upgrade", "").lower() == "websocket":
            return await self._play_websocket(request)
        received = ReceivedRequest(
            method=request.method,
            path=request.path_qs,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=await request.read(),
        )
        self.received.append(received)
        reply = self.responder(received)
        if reply.pause_before_headers:
            await asyncio.sleep(reply.pause_before_headers)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        if "content-length" not in {name.lower() for name in reply.headers}:
            response.enable_chunked_encoding()
        await response.prepare(request)
        for index, chunk in enumerate(reply.chunks):
            if index == 1:
                if reply.pause_after_first:
                    await asyncio.sleep(reply.pause_after_first)
                self.second_chunk_times.append(time.monotonic())
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _play_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Play `websocket_script`: send the server's frames, wait for each client frame."""
        self.received.append(ReceivedRequest("GET", request.path_qs, dict(request.headers), b""))
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        for direction, payload in self.websocket_script:
            if direction == "server":
                await socket.send_str(payload)
            else:
                message = await socket.receive(timeout=10)
                self.websocket_received.append(message.data)
        await socket.close()
        return socket


def server_ssl_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context

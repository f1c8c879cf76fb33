"""The WebSocket metering addon: usage read from the messages of a metered connection.

Results are recorded as the meter returns them: one per response for APIs that report
usage per response, one per connection from `websocket_end` otherwise.

NOTE: a WebSocket session has no preflight, so hard budgets neither deny nor hold it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mitmproxy import http

from costtap.addons.admin import Metrics
from costtap.addons.identify import METADATA_APP, METADATA_IDENTITY
from costtap.config.store import AppsStore
from costtap.providers import websocket_meter_for
from costtap.providers.base import MeterResult, Route, WebSocketMeter
from costtap.tracker.base import Tracker
from costtap.tracker.events import Status, UsageEvent, extra_identity, new_request_id

logger = logging.getLogger(__name__)


@dataclass
class WebSocketCall:
    """State of one metered WebSocket connection."""

    app: str
    route: Route
    meter: WebSocketMeter
    connection_id: str
    identity: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"[ws {self.connection_id} app={self.app}]"


class WebSocketMetering:
    def __init__(self, tracker: Tracker, store: AppsStore, metrics: Metrics) -> None:
        self._tracker = tracker
        self._store = store
        self._metrics = metrics
        self._connections: dict[str, WebSocketCall] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        if flow.request.headers.get("upgrade", "").lower() != "websocket":
            return
        found = websocket_meter_for(flow.request.host, flow.request.path)
        if found is None:
            return
        route, meter = found
        call = WebSocketCall(
            self._store.current.default_app, route, meter, connection_id=new_request_id()
        )
        self._connections[flow.id] = call
        logger.debug("%s metering %s %s", call.label, route.provider, route.endpoint)

    def request(self, flow: http.HTTPFlow) -> None:
        call = self._connections.get(flow.id)
        if call is not None:
            call.app = flow.metadata.get(METADATA_APP, call.app)
            call.identity = flow.metadata.get(METADATA_IDENTITY, {})

    def error(self, flow: http.HTTPFlow) -> None:
        # The upgrade failed: no connection, nothing billed.
        self._connections.pop(flow.id, None)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        call = self._connections.get(flow.id)
        if call is None or flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        try:
            if message.from_client:
                results = call.meter.client_message(message.content, message.is_text)
            else:
                results = call.meter.server_message(message.content, message.is_text)
        except Exception:
            logger.exception("%s cannot read a WebSocket message; it is not metered", call.label)
            results = []
        # mitmproxy keeps every message of a flow, and audio sessions can run for hours.
        # Messages already read are dropped from the flow's history to bound memory.
        flow.websocket.messages.clear()
        for result in results:
            await self._record(call, result)

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        call = self._connections.pop(flow.id, None)
        if call is None:
            return
        try:
            results = call.meter.finish()
        except Exception:
            logger.exception("%s cannot finish metering the connection", call.label)
            results = []
        for result in results:
            await self._record(call, result)
        logger.debug("%s connection ended", call.label)

    async def _record(self, call: WebSocketCall, result: MeterResult) -> None:
        event = UsageEvent(
            request_id=new_request_id(),
            time=datetime.now(UTC),
            app=call.app,
            provider=call.route.provider,
            endpoint=call.route.endpoint,
            model=result.model,
            units=result.units,
            status=Status.SUCCESS,
            estimated=not result.usage_reported,
            estimate_reason=result.estimate_reason,
            user=call.identity.get("user"),
            project=call.identity.get("project"),
            job=call.identity.get("job"),
            extra=extra_identity(call.identity),
        )
        await self._tracker.record(event)
        self._metrics.calls.labels(
            provider=event.provider, endpoint=event.endpoint, status="success"
        ).inc()

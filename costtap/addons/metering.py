"""The metering addon: classify each call, check its budget, tap its response, record it.

It never changes what the client receives, except for the usage data costtap requested
itself (see `tap`) and the provider-shaped 402 of a denied call, which never leaves. It
does no blocking I/O on the event loop: parsing is incremental, and the tracker does its
I/O in its own thread or over aiohttp. The one wait a client sees is the durable commit of
its record, which happens before the end of its response is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from mitmproxy import http

from costtap.addons.admin import Metrics
from costtap.addons.identify import METADATA_APP, METADATA_IDENTITY, METADATA_PROVIDER_HOST
from costtap.addons.tap import ResponseTap, make_tap
from costtap.config.store import AppsStore
from costtap.providers import provider_for_host
from costtap.providers.base import MeterResult, Provider, RequestInfo, Route, Units
from costtap.tracker.base import Decision, PreflightCall, Tracker
from costtap.tracker.events import Status, UsageEvent, extra_identity, new_request_id

logger = logging.getLogger(__name__)

METADATA_REQUEST_ID = "costtap.request_id"
# Responses that costtap made itself (a denied call) carry this key and are not metered.
METADATA_DENIED = "costtap.denied"
# Unknown provider paths are logged once each, up to this many distinct paths.
MAX_LOGGED_UNKNOWN_PATHS = 1000


@dataclass
class Call:
    """State of one metered call, kept by the addon between hooks."""

    request_id: str
    app: str
    flow: http.HTTPFlow
    provider: Provider
    route: Route
    started: datetime
    request: RequestInfo = field(default_factory=RequestInfo)
    tap: ResponseTap | None = None
    identity: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"[{self.request_id} app={self.app}]"


class Metering:
    """Meter provider calls over HTTP; leave every other flow untouched."""

    def __init__(self, tracker: Tracker, store: AppsStore, metrics: Metrics) -> None:
        self._tracker = tracker
        self._store = store
        self._metrics = metrics
        self._calls: dict[str, Call] = {}
        self._unknown_paths: set[tuple[str, str]] = set()

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        host = flow.request.host.lower().rstrip(".")
        provider = provider_for_host(host)
        if provider is None:
            return
        flow.metadata[METADATA_PROVIDER_HOST] = host
        if flow.request.headers.get("upgrade", "").lower() == "websocket":
            return  # the WebSocket addon meters upgrades
        route = provider.match(host, flow.request.method, flow.request.path)
        if route is not None and route.free:
            self._metrics.free_calls.labels(provider=route.provider, endpoint=route.endpoint).inc()
            return
        if route is None:
            self._log_unknown(host, flow.request.method, flow.request.path)
            return
        call = Call(
            request_id=new_request_id(),
            app=self._store.current.default_app,
            flow=flow,
            provider=provider,
            route=route,
            started=datetime.now(UTC),
        )
        flow.metadata[METADATA_REQUEST_ID] = call.request_id
        self._calls[flow.id] = call

    async def request(self, flow: http.HTTPFlow) -> None:
        call = self._calls.get(flow.id)
        if call is None or flow.response is not None or flow.error is not None:
            return
        call.app = flow.metadata.get(METADATA_APP, call.app)
        call.identity = flow.metadata.get(METADATA_IDENTITY, {})
        try:
            body = flow.request.get_content(strict=False) or b""
            call.request = call.provider.read_request(call.route, body, flow.request.headers)
        except Exception:
            logger.exception("%s cannot read the request; sending it unchanged", call.label)

        preflight = self._preflight_call(call)
        try:
            decision = await self._tracker.preflight(preflight)
        except Exception:
            # A failing tracker must not break the call: the app's policy decides, as when
            # the tracker is unreachable.
            logger.exception(
                "%s preflight failed; app policy %s applies",
                call.label,
                preflight.unreachable_policy,
            )
            allow = preflight.unreachable_policy == "allow"
            decision = Decision(
                allow, call.request_id, None if allow else "preflight failed", decided_by="policy"
            )
        call.request_id = decision.request_id
        flow.metadata[METADATA_REQUEST_ID] = call.request_id
        if not decision.allow:
            self._deny(
                flow, call, decision.reason or "denied by the cost tracker", decision.retry_later
            )
            return
        if call.request.upstream_body is not None:
            flow.request.content = call.request.upstream_body
            logger.debug("%s requested stream usage upstream", call.label)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = self._calls.get(flow.id)
        if call is None or flow.response is None or METADATA_DENIED in flow.metadata:
            return
        try:
            call.tap = make_tap(call.label, call.provider, call.route, call.request, flow.response)
        except Exception:
            logger.exception("%s cannot tap the response; usage will be estimated", call.label)
            return
        flow.response.stream = call.tap

    async def response(self, flow: http.HTTPFlow) -> None:
        # mitmproxy sends the end of a streamed response after this hook, so awaiting the
        # record here commits it before a chunked or HTTP/2 client sees the response end.
        # NOTE: a Content-Length response is complete at its last byte, just before this.
        call = self._calls.pop(flow.id, None)
        if call is None:
            return
        if METADATA_DENIED in flow.metadata:
            await self._record(call, flow, Status.DENIED)
            return
        status_code = flow.response.status_code if flow.response is not None else None
        status = Status.SUCCESS if status_code is not None and status_code < 400 else Status.ERROR
        await self._record(call, flow, status)

    async def error(self, flow: http.HTTPFlow) -> None:
        call = self._calls.pop(flow.id, None)
        if call is None:
            return
        message = flow.error.msg if flow.error is not None else ""
        status = Status.CANCELLED if "client disconnected" in message.lower() else Status.ERROR
        if status is Status.CANCELLED:
            logger.info("%s call ended early: %s", call.label, message)
        else:
            logger.warning("%s call failed: %s", call.label, message)
        await self._record(call, flow, status)

    async def done(self) -> None:
        """Record the calls still open at stop as cancelled, before the tracker closes."""
        if not self._calls:
            return
        logger.warning(
            "recording the metered calls still open at stop as cancelled: %d",
            len(self._calls),
        )
        while self._calls:
            _, call = self._calls.popitem()
            await self._record(call, call.flow, Status.CANCELLED)

    def _preflight_call(self, call: Call) -> PreflightCall:
        app = self._store.current.app(call.app)
        return PreflightCall(
            request_id=call.request_id,
            app=call.app,
            user=call.identity.get("user"),
            project=call.identity.get("project"),
            job=call.identity.get("job"),
            provider=call.route.provider,
            model=call.request.model,
            estimate=call.request.estimate,
            unreachable_policy=app.tracker_unreachable if app is not None else "allow",
            output_is_default=call.request.output_is_default,
            ceiling=call.request.ceiling,
        )

    def _deny(self, flow: http.HTTPFlow, call: Call, reason: str, retry_later: bool) -> None:
        """Respond in the provider's own error shape; the call never reaches the provider.

        The OpenAI SDKs follow `x-should-retry`: a call that only timed out waiting for calls
        in flight may fit later, so they retry it. Other denials are final.
        """
        flow.metadata[METADATA_DENIED] = True
        flow.response = http.Response.make(
            402,
            call.provider.deny_body(f"costtap: {reason}"),
            {
                "Content-Type": "application/json",
                "x-should-retry": "true" if retry_later else "false",
            },
        )
        self._metrics.denied.labels(provider=call.route.provider, app=call.app).inc()
        logger.warning("%s call denied: %s", call.label, reason)

    async def _record(self, call: Call, flow: http.HTTPFlow, status: Status) -> None:
        try:
            event = self._build_event(call, flow, status)
        except Exception:
            logger.exception("%s cannot build the usage event", call.label)
            return
        try:
            await self._tracker.record(event)
        except Exception:
            logger.exception("%s the usage record could not be stored", call.label)
            return
        labels = {"provider": event.provider, "endpoint": event.endpoint}
        self._metrics.calls.labels(status=str(event.status), **labels).inc()
        if event.estimated:
            self._metrics.estimated.labels(**labels).inc()
        if call.tap is not None and call.tap.parse_failure is not None:
            self._metrics.parse_failures.labels(**labels).inc()

    def _build_event(self, call: Call, flow: http.HTTPFlow, status: Status) -> UsageEvent:
        response = flow.response
        tap = call.tap
        estimate_reason: str | None = None

        if response is None and status is Status.CANCELLED and _reached_upstream(flow):
            # The provider has the request and may bill it, although no response came back.
            result = MeterResult(
                call.request.model,
                replace(call.request.estimate),
                False,
                "the call ended before a response came: the preflight estimate is recorded",
            )
        elif tap is None or response is None:
            # Nothing came back from the provider (or costtap denied the call): nothing billed.
            result = MeterResult(call.request.model, Units(), True)
        else:
            result = tap.result()
            if tap.parse_failure is not None:
                result = MeterResult(result.model, result.units, False, tap.parse_failure)
            if response.status_code >= 400 and not result.usage_reported:
                # A provider's error response carries no usage and is not billed.
                result = MeterResult(result.model, Units(), True)

        estimated = not result.usage_reported
        if estimated:
            estimate_reason = result.estimate_reason or "usage not reported"
            if result.units.is_empty():
                # Never record an estimated call as free: fall back to the preflight estimate.
                result.units = Units(
                    input_tokens=call.request.estimate.input_tokens,
                    output_tokens=call.request.estimate.output_tokens,
                )
            logger.info("%s usage estimated: %s", call.label, estimate_reason)

        request_start = flow.request.timestamp_start
        latency_ms = ttfb_ms = None
        if response is not None and response.timestamp_start and status is not Status.DENIED:
            ttfb_ms = round((response.timestamp_start - request_start) * 1000)
            end = response.timestamp_end or datetime.now(UTC).timestamp()
            latency_ms = round((end - request_start) * 1000)

        return UsageEvent(
            request_id=call.request_id,
            time=call.started,
            app=call.app,
            provider=call.route.provider,
            endpoint=call.route.endpoint,
            model=result.model or call.request.model,
            units=result.units,
            status=status,
            estimated=estimated,
            estimate_reason=estimate_reason,
            latency_ms=latency_ms,
            ttfb_ms=ttfb_ms,
            http_status=response.status_code if response is not None else None,
            user=call.identity.get("user"),
            project=call.identity.get("project"),
            job=call.identity.get("job"),
            extra=extra_identity(call.identity),
        )

    def _log_unknown(self, host: str, method: str, path: str) -> None:
        path_only = path.split("?", 1)[0]
        if (host, path_only) in self._unknown_paths or len(
            self._unknown_paths
        ) >= MAX_LOGGED_UNKNOWN_PATHS:
            return
        self._unknown_paths.add((host, path_only))
        logger.debug("unmetered %s %s%s", method, host, path_only)


def _reached_upstream(flow: http.HTTPFlow) -> bool:
    """Return whether costtap opened the upstream connection, so the request went out."""
    return flow.server_conn.timestamp_start is not None

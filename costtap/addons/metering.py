"""The metering addon: classify each call, tap its response, record its usage.

It never changes the bytes sent to the client, with one exception: the usage data that
costtap itself asked the provider for is removed before a client that did not ask sees it.
It never blocks the event loop: parsing is incremental and cheap, and records go to a
writer thread through a queue.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from mitmproxy import http

from costtap.addons.admin import Metrics
from costtap.addons.identify import METADATA_APP, METADATA_IDENTITY, METADATA_PROVIDER_HOST
from costtap.config.store import AppsStore
from costtap.providers import provider_for_host, websocket_meter_for
from costtap.providers.base import (
    ClientStreamFilter,
    MeterResult,
    Provider,
    RequestInfo,
    ResponseParser,
    Route,
    Units,
    WebSocketMeter,
    media_type,
)
from costtap.providers.decoding import Decoder, DecodingError, make_decoder
from costtap.tracker.events import Status, UsageEvent, new_request_id

logger = logging.getLogger(__name__)

METADATA_REQUEST_ID = "costtap.request_id"
# Unknown provider paths are logged once each, up to this many distinct paths.
MAX_LOGGED_UNKNOWN_PATHS = 1000


class Recorder(Protocol):
    def submit(self, event: UsageEvent) -> None: ...


@dataclass
class Call:
    """State of one metered call, kept by the addon between hooks."""

    request_id: str
    app: str
    provider: Provider
    route: Route
    started: datetime
    request: RequestInfo = field(default_factory=RequestInfo)
    tap: ResponseTap | None = None
    identity: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"[{self.request_id} app={self.app}]"


class ResponseTap:
    """The stream function of a metered response.

    mitmproxy calls it once per chunk as the chunk arrives, then once with b"" at a clean end.
    It returns the upstream's bytes untouched, or, with a client filter, the decoded and
    filtered bytes. It never raises: a parser failure stops parsing, never the stream.
    """

    def __init__(
        self,
        label: str,
        decoder: Decoder | None,
        parser: ResponseParser,
        client_filter: ClientStreamFilter | None,
    ) -> None:
        self._label = label
        self._decoder = decoder
        self._parser = parser
        self._filter = client_filter
        self.parse_failure: str | None = (
            None if decoder is not None else "unsupported content encoding"
        )
        self.bytes_seen = 0
        self.ended = False

    def __call__(self, data: bytes) -> Iterable[bytes]:
        if self._filter is not None:
            return self._filtered(data)
        self._observe(data)
        # An empty chunk would end an HTTP/1 chunked body early, so nothing is sent for it.
        return [data] if data else []

    def _observe(self, data: bytes) -> bytes:
        """Feed the parser; return the decoded bytes (empty after a failure)."""
        self.bytes_seen += len(data)
        if self.parse_failure is not None or self._decoder is None:
            return b""
        try:
            if data:
                decoded = self._decoder.feed(data)
                self._parser.feed(decoded)
                return decoded
            self.ended = True
            decoded = self._decoder.flush()
            self._parser.feed(decoded)
            return decoded
        except DecodingError as error:
            self._fail(f"cannot decode body: {error}")
        except Exception as error:  # the parser must never break the stream
            self._fail(f"parser failed: {error!r}")
        return b""

    def _filtered(self, data: bytes) -> list[bytes]:
        assert self._filter is not None
        decoded = self._observe(data)
        if self.parse_failure is not None:
            # NOTE: after a decoding failure the client gets the raw bytes that follow.
            return [data] if data else []
        try:
            output = self._filter.feed(decoded)
            if not data:  # the end of the body: release what the filter still holds
                output += self._filter.finish()
        except Exception as error:
            self._fail(f"usage filter failed: {error!r}")
            return [decoded] if decoded else []
        return [output] if output else []

    def _fail(self, reason: str) -> None:
        if self.parse_failure is None:
            self.parse_failure = reason
            logger.warning("%s %s; usage will be estimated", self._label, reason)

    def result(self) -> MeterResult:
        return self._parser.finish()


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


class Metering:
    """Meter provider calls; leave every other flow untouched."""

    def __init__(
        self, recorder: Recorder, store: AppsStore, metrics: Metrics | None = None
    ) -> None:
        self._recorder = recorder
        self._store = store
        self._metrics = metrics or Metrics()
        self._calls: dict[str, Call] = {}
        self._unknown_paths: set[tuple[str, str]] = set()
        self._websockets: dict[str, WebSocketCall] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        host = flow.request.host.lower().rstrip(".")
        provider = provider_for_host(host)
        if provider is None:
            return
        flow.metadata[METADATA_PROVIDER_HOST] = host
        if flow.request.headers.get("upgrade", "").lower() == "websocket":
            self._start_websocket(flow, host)
            return
        route = provider.match(host, flow.request.method, flow.request.path)
        if route is not None and route.free:
            self._metrics.free_calls.labels(provider=route.provider, endpoint=route.endpoint).inc()
            return
        if route is None:
            path = flow.request.path.split("?", 1)[0]
            if (host, path) in self._unknown_paths:
                return
            if len(self._unknown_paths) < MAX_LOGGED_UNKNOWN_PATHS:
                self._unknown_paths.add((host, path))
            logger.debug(
                "unmetered %s %s%s",
                flow.request.method,
                flow.request.host,
                flow.request.path.split("?", 1)[0],
            )
            return
        call = Call(
            request_id=new_request_id(),
            app=self._store.current.default_app,
            provider=provider,
            route=route,
            started=datetime.now(UTC),
        )
        flow.metadata[METADATA_REQUEST_ID] = call.request_id
        self._calls[flow.id] = call

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        websocket = self._websockets.get(flow.id)
        if websocket is not None:
            websocket.app = flow.metadata.get(METADATA_APP, websocket.app)
            websocket.identity = flow.metadata.get(METADATA_IDENTITY, {})
        call = self._calls.get(flow.id)
        if call is None:
            return
        call.app = flow.metadata.get(METADATA_APP, call.app)
        call.identity = flow.metadata.get(METADATA_IDENTITY, {})
        try:
            body = flow.request.get_content(strict=False) or b""
            call.request = call.provider.read_request(call.route, body, flow.request.headers)
            if call.request.upstream_body is not None:
                flow.request.content = call.request.upstream_body
                logger.debug("%s asked upstream for stream usage", call.label)
        except Exception:
            logger.exception("%s cannot read the request; sending it unchanged", call.label)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = self._calls.get(flow.id)
        if call is None or flow.response is None:
            return
        try:
            call.tap = self._make_tap(call, flow.response)
        except Exception:
            logger.exception("%s cannot tap the response; usage will be estimated", call.label)
            return
        flow.response.stream = call.tap

    def response(self, flow: http.HTTPFlow) -> None:
        call = self._calls.pop(flow.id, None)
        if call is None:
            return
        status_code = flow.response.status_code if flow.response is not None else None
        status = Status.SUCCESS if status_code is not None and status_code < 400 else Status.ERROR
        self._finish(call, flow, status)

    def error(self, flow: http.HTTPFlow) -> None:
        call = self._calls.pop(flow.id, None)
        if call is None:
            return
        message = flow.error.msg if flow.error is not None else ""
        status = Status.CANCELLED if "client disconnected" in message.lower() else Status.ERROR
        if status is Status.CANCELLED:
            logger.info("%s call ended early: %s", call.label, message)
        else:
            logger.warning("%s call failed: %s", call.label, message)
        self._finish(call, flow, status)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        call = self._websockets.get(flow.id)
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
            self._submit_websocket_result(call, result)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        call = self._websockets.pop(flow.id, None)
        if call is None:
            return
        try:
            results = call.meter.finish()
        except Exception:
            logger.exception("%s cannot finish metering the connection", call.label)
            results = []
        for result in results:
            self._submit_websocket_result(call, result)
        logger.debug("%s connection ended", call.label)

    def _start_websocket(self, flow: http.HTTPFlow, host: str) -> None:
        found = websocket_meter_for(host, flow.request.path)
        if found is None:
            return
        route, meter = found
        app = self._store.current.default_app
        call = WebSocketCall(app, route, meter, connection_id=new_request_id())
        self._websockets[flow.id] = call
        logger.debug("%s metering %s %s", call.label, route.provider, route.endpoint)

    def _submit_websocket_result(self, call: WebSocketCall, result: MeterResult) -> None:
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
            extra=_extra_identity(call.identity),
        )
        self._recorder.submit(event)
        self._metrics.calls.labels(
            provider=event.provider, endpoint=event.endpoint, status="success"
        ).inc()

    def done(self) -> None:
        if self._calls:
            logger.warning(
                "stopping with %d metered calls still open; they are not recorded", len(self._calls)
            )

    def _make_tap(self, call: Call, response: http.Response) -> ResponseTap:
        encoding = response.headers.get("content-encoding")
        decoder: Decoder | None
        try:
            decoder = make_decoder(encoding)
        except DecodingError as error:
            logger.warning("%s %s; usage will be estimated", call.label, error)
            decoder = None
        parser = call.provider.response_parser(call.route, call.request, response.headers)

        client_filter = None
        is_event_stream = media_type(response.headers) == "text/event-stream"
        if call.request.hide_usage_from_client and is_event_stream and decoder is not None:
            client_filter = call.provider.client_filter(call.route)
        if client_filter is not None:
            # The filter sends decoded, shortened bytes, so the framing headers must follow.
            response.headers.pop("content-encoding", None)
            had_length = response.headers.pop("content-length", None) is not None
            if had_length and response.http_version.startswith("HTTP/1"):
                response.headers["transfer-encoding"] = "chunked"
        elif call.request.hide_usage_from_client and is_event_stream and decoder is None:
            logger.warning(
                "%s cannot remove the usage chunk from an undecodable stream", call.label
            )
        return ResponseTap(call.label, decoder, parser, client_filter)

    def _finish(self, call: Call, flow: http.HTTPFlow, status: Status) -> None:
        try:
            event = self._build_event(call, flow, status)
        except Exception:
            logger.exception("%s cannot build the usage event", call.label)
            return
        self._recorder.submit(event)
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

        if tap is None or response is None:
            # Nothing came back from the provider, so nothing was billed.
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
        if response is not None and response.timestamp_start:
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
            extra=_extra_identity(call.identity),
        )


def _extra_identity(identity: dict[str, str]) -> dict[str, str]:
    """Return the identity fields beyond user, project and job (names and emails)."""
    return {
        name: value for name, value in identity.items() if name not in ("user", "project", "job")
    }

"""The response tap: the stream function that observes a metered response.

It never changes the bytes sent to the client, with one exception: the usage data that
costtap itself requested is removed before a client that did not request it receives it.
It never raises: a decoder or parser failure stops parsing, never the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mitmproxy import http

from costtap.providers.base import (
    ClientStreamFilter,
    MeterResult,
    Provider,
    RequestInfo,
    ResponseParser,
    Route,
    media_type,
)
from costtap.providers.decoding import Decoder, DecodingError, make_decoder

logger = logging.getLogger(__name__)


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

    def __call__(self, data: bytes) -> Iterable[bytes]:
        if self._filter is not None:
            return self._filtered(data)
        self._observe(data)
        # An empty chunk would end an HTTP/1 chunked body early, so nothing is sent for it.
        return [data] if data else []

    def _observe(self, data: bytes) -> bytes:
        """Feed the parser; return the decoded bytes (empty after a failure)."""
        if self.parse_failure is not None or self._decoder is None:
            return b""
        try:
            if data:
                decoded = self._decoder.feed(data)
                self._parser.feed(decoded)
                return decoded
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


def make_tap(
    label: str, provider: Provider, route: Route, request: RequestInfo, response: http.Response
) -> ResponseTap:
    """Build the tap for a response, adjusting its framing headers when costtap rewrites it."""
    encoding = response.headers.get("content-encoding")
    decoder: Decoder | None
    try:
        decoder = make_decoder(encoding)
    except DecodingError as error:
        logger.warning("%s %s; usage will be estimated", label, error)
        decoder = None
    parser = provider.response_parser(route, request, response.headers)

    client_filter = None
    is_event_stream = media_type(response.headers) == "text/event-stream"
    if request.hide_usage_from_client and is_event_stream and decoder is not None:
        client_filter = provider.client_filter(route)
    if client_filter is not None:
        # The filter sends decoded, shortened bytes, so the framing headers must follow.
        response.headers.pop("content-encoding", None)
        had_length = response.headers.pop("content-length", None) is not None
        if had_length and response.http_version.startswith("HTTP/1"):
            response.headers["transfer-encoding"] = "chunked"
    elif request.hide_usage_from_client and is_event_stream and decoder is None:
        logger.warning("%s cannot remove the usage chunk from an undecodable stream", label)
    return ResponseTap(label, decoder, parser, client_filter)

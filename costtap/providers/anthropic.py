"""Anthropic Messages API: which calls are metered and how their usage is read.

Wire facts this module relies on (Anthropic API reference, messages and streaming):

- `usage.input_tokens` excludes prompt-cache traffic: `cache_read_input_tokens` and
  `cache_creation_input_tokens` are billed on top of it. costtap's `input_tokens` counts
  every input token, so it is the sum of the three.
- A stream opens with `message_start`, whose usage has the input counts and a placeholder
  output count. Each `message_delta` carries the cumulative usage so far: its values
  replace the earlier ones, they are never added to them.
- Thinking tokens are billed inside `output_tokens`.

Pure code: no mitmproxy, no I/O, and no parser method raises on malformed input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from costtap.providers.base import (
    MeterResult,
    RequestInfo,
    ResponseParser,
    Route,
    Units,
    media_type,
)
from costtap.providers.ceiling import text_request_ceiling
from costtap.providers.common import (
    JsonResponseParser,
    SseJsonParser,
    as_dict,
    as_int,
    as_str,
    count_text_chars,
    estimate_chat_input,
    estimated,
    load_json_object,
)

ANTHROPIC = "anthropic"
MESSAGES = "messages"

DEFAULT_OUTPUT_TOKENS = 1024

_MESSAGES_PATH = re.compile(r"^/v1/messages/?$")
_FREE_PATH = re.compile(r"^/v1/(?:messages/count_tokens|models|files|messages/batches)(?:/.*)?$")
_USAGE_FIELDS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens",
)


class AnthropicProvider:
    name: str = ANTHROPIC
    host_patterns: tuple[str, ...] = (r"api\.anthropic\.com",)

    def match(self, host: str, method: str, path: str) -> Route | None:
        path_only = path.split("?", 1)[0]
        if method == "POST" and _MESSAGES_PATH.match(path_only):
            return Route(ANTHROPIC, MESSAGES)
        if method == "GET" or _FREE_PATH.match(path_only):
            return Route(ANTHROPIC, path_only.removeprefix("/v1/").split("/", 1)[0], free=True)
        return None

    def read_request(self, route: Route, body: bytes, headers: Mapping[str, str]) -> RequestInfo:
        payload = load_json_object(body)
        if payload is None:
            return RequestInfo()
        # Anthropic requires an output cap, and it includes extended thinking.
        cap = as_int(payload.get("max_tokens"))
        return RequestInfo(
            model=as_str(payload.get("model")),
            streaming=payload.get("stream") is True,
            estimate=Units(
                input_tokens=estimate_chat_input(
                    payload.get("messages"), payload.get("system"), payload.get("tools")
                ),
                output_tokens=cap or DEFAULT_OUTPUT_TOKENS,
            ),
            output_is_default=not cap,
            ceiling=text_request_ceiling(body, payload, cap) if cap else None,
        )

    def response_parser(
        self, route: Route, request: RequestInfo, headers: Mapping[str, str]
    ) -> ResponseParser:
        if media_type(headers) == "text/event-stream":
            return MessagesStreamParser(request)
        return MessagesBodyParser(request)

    def deny_body(self, message: str) -> bytes:
        return json.dumps(
            {"type": "error", "error": {"type": "billing_error", "message": message}}
        ).encode()

    def client_filter(self, route: Route) -> None:
        return None


def usage_to_units(usage: Mapping[str, Any]) -> Units:
    cache_read = as_int(usage.get("cache_read_input_tokens"))
    cache_write = as_int(usage.get("cache_creation_input_tokens"))
    return Units(
        input_tokens=as_int(usage.get("input_tokens")) + cache_read + cache_write,
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
        output_tokens=as_int(usage.get("output_tokens")),
    )


class MessagesBodyParser(JsonResponseParser):
    def read(self, payload: dict[str, Any]) -> MeterResult:
        model = as_str(payload.get("model"))
        usage = payload.get("usage")
        if isinstance(usage, dict):
            return MeterResult(model or self.request.model, usage_to_units(usage), True)
        return estimated(
            self.request,
            model,
            count_text_chars(payload.get("content")),
            "response carries no usage",
        )


class MessagesStreamParser(SseJsonParser):
    """Messages stream: `message_start` usage, replaced field by field by `message_delta`."""

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._model: str | None = None
        self._usage: dict[str, int] = {}
        self._has_final_usage = False
        self._output_chars = 0

    def take(self, name: str, event: dict[str, Any]) -> None:
        kind = as_str(event.get("type")) or name
        if kind == "message_start":
            message = as_dict(event.get("message"))
            self._model = as_str(message.get("model")) or self._model
            self._merge(as_dict(message.get("usage")))
        elif kind == "message_delta":
            usage = as_dict(event.get("usage"))
            if usage:
                self._merge(usage)
                self._has_final_usage = True
        elif kind == "content_block_delta":
            delta = as_dict(event.get("delta"))
            for key in ("text", "thinking", "partial_json"):
                self._output_chars += len(as_str(delta.get(key)) or "")

    def _merge(self, usage: dict[str, Any]) -> None:
        for field in _USAGE_FIELDS:
            if field in usage:
                self._usage[field] = as_int(usage[field])

    def result(self) -> MeterResult:
        if self._has_final_usage:
            return MeterResult(self._model or self.request.model, usage_to_units(self._usage), True)
        # The stream ended before its final usage: input is known from message_start, the
        # output is estimated from the text seen.
        reason = "stream ended without message_delta usage"
        result = estimated(self.request, self._model, self._output_chars, reason)
        if self._usage:
            known = usage_to_units(self._usage)
            result.units.input_tokens = known.input_tokens
            result.units.cached_input_tokens = known.cached_input_tokens
            result.units.cache_write_tokens = known.cache_write_tokens
        return result

"""Gemini Live API over a WebSocket: usage from the server's `usageMetadata`.

Wire facts (Gemini Live API reference, BidiGenerateContent): the client's first message is
`setup`, whose `model` is `models/{model}`. Server messages may carry `usageMetadata` with
`promptTokenCount`, `responseTokenCount` and `thoughtsTokenCount`; thinking is billed as
output, as in generateContent. The usage of a turn is recorded when the server reports the
turn complete, and any usage still pending when the connection ends.

Pure code: no mitmproxy, no I/O, and no method raises on malformed input.
"""

from __future__ import annotations

from typing import Any

from costtap.providers.base import MeterResult, Route, Units
from costtap.providers.common import as_dict, as_int, as_str, load_json_object

LIVE = "live"
_LIVE_PATH_SUFFIX = "GenerativeService.BidiGenerateContent"


def match_live(host: str, path: str, provider: str) -> Route | None:
    path_only = path.split("?", 1)[0].rstrip("/")
    if path_only.startswith("/ws/") and path_only.endswith(_LIVE_PATH_SUFFIX):
        return Route(provider, LIVE)
    return None


def live_usage_to_units(usage: dict[str, Any]) -> Units:
    thoughts = as_int(usage.get("thoughtsTokenCount"))
    return Units(
        input_tokens=as_int(usage.get("promptTokenCount"))
        + as_int(usage.get("toolUsePromptTokenCount")),
        cached_input_tokens=as_int(usage.get("cachedContentTokenCount")),
        output_tokens=as_int(usage.get("responseTokenCount")) + thoughts,
        reasoning_tokens=thoughts,
    )


class LiveMeter:
    def __init__(self, route: Route) -> None:
        self._model = route.path_model
        self._pending: dict[str, Any] | None = None

    def client_message(self, content: bytes, is_text: bool) -> list[MeterResult]:
        message = load_json_object(content)
        setup = as_dict(message.get("setup")) if message is not None else {}
        if model := as_str(setup.get("model")):
            self._model = model.removeprefix("models/")
        return []

    def server_message(self, content: bytes, is_text: bool) -> list[MeterResult]:
        # Live sends JSON in text or binary frames alike.
        message = load_json_object(content)
        if message is None:
            return []
        if usage := as_dict(message.get("usageMetadata")):
            self._pending = usage
        turn_complete = as_dict(message.get("serverContent")).get("turnComplete") is True
        if turn_complete and self._pending is not None:
            return self._flush()
        return []

    def finish(self) -> list[MeterResult]:
        return self._flush() if self._pending is not None else []

    def _flush(self) -> list[MeterResult]:
        assert self._pending is not None
        result = MeterResult(self._model, live_usage_to_units(self._pending), True)
        self._pending = None
        return [result]

"""OpenAI: which calls are metered and how their usage is read.

Wire facts this module relies on (OpenAI API reference, chat completions):

- `usage.prompt_tokens` counts every input token; `prompt_tokens_details.cached_tokens`,
  `.cache_write_tokens` and `.audio_tokens` are parts of it. `usage.completion_tokens`
  counts every output token; `completion_tokens_details.reasoning_tokens` and
  `.audio_tokens` are parts of it.
- The response's `model` is the dated model that served the call (`gpt-4o-2024-08-06`),
  while the request names an alias (`gpt-4o`).
- A chat stream carries usage only when the request sets `stream_options.include_usage`.
  Then every chunk gets `"usage":null` and one extra chunk with `"choices":[]` and the
  usage comes last, before `data: [DONE]`.

Pure code: no mitmproxy, no I/O, and no parser method raises on malformed input.
"""

from __future__ import annotations

import json
import re
from typing import Any

from costtap.providers.base import (
    MeterResult,
    RequestInfo,
    Route,
    Units,
    estimate_tokens_from_chars,
)
from costtap.providers.jsonbody import JsonBodyReader
from costtap.providers.sse import SseSplitter, find_line_end

NAME = "openai"
HOSTS: tuple[str, ...] = ("api.openai.com",)

CHAT_COMPLETIONS = "chat.completions"

# Output tokens assumed for an estimate when the request sets no output cap.
DEFAULT_OUTPUT_TOKENS = 1024

_CHAT_PATH = re.compile(r"^/v1/chat/completions/?$")


class OpenAIProvider:
    name: str = NAME
    hosts: tuple[str, ...] = HOSTS

    def match(self, method: str, path: str) -> Route | None:
        path_only = path.split("?", 1)[0]
        if method == "POST" and _CHAT_PATH.match(path_only):
            return Route(NAME, CHAT_COMPLETIONS)
        return None

    def read_request(self, route: Route, body: bytes) -> RequestInfo:
        return read_chat_request(body)

    def response_parser(
        self, route: Route, request: RequestInfo, content_type: str
    ) -> ChatStreamParser | ChatBodyParser:
        if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
            return ChatStreamParser(request)
        return ChatBodyParser(request)

    def client_filter(self, route: Route) -> UsageChunkRemover:
        return UsageChunkRemover()


def read_chat_request(body: bytes) -> RequestInfo:
    """Read model, stream flag and estimate, and ask for stream usage if the client did not."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return RequestInfo()
    if not isinstance(payload, dict):
        return RequestInfo()

    model = payload.get("model")
    info = RequestInfo(
        model=model if isinstance(model, str) else None,
        streaming=payload.get("stream") is True,
        estimate=Units(
            input_tokens=estimate_tokens_from_chars(_count_text_chars(payload.get("messages"))),
            output_tokens=_output_cap(payload),
        ),
    )

    stream_options = payload.get("stream_options")
    asked_for_usage = (
        isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    )
    if info.streaming and not asked_for_usage:
        options = dict(stream_options) if isinstance(stream_options, dict) else {}
        options["include_usage"] = True
        payload["stream_options"] = options
        info.upstream_body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        info.hide_usage_from_client = True
    return info


def chat_usage_to_units(usage: dict[str, Any]) -> Units:
    """Map a chat completions `usage` object onto costtap's units."""
    prompt_details = _dict(usage.get("prompt_tokens_details"))
    completion_details = _dict(usage.get("completion_tokens_details"))
    return Units(
        input_tokens=_int(usage.get("prompt_tokens")),
        cached_input_tokens=_int(prompt_details.get("cached_tokens")),
        cache_write_tokens=_int(prompt_details.get("cache_write_tokens")),
        audio_input_tokens=_int(prompt_details.get("audio_tokens")),
        output_tokens=_int(usage.get("completion_tokens")),
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")),
        audio_output_tokens=_int(completion_details.get("audio_tokens")),
    )


class ChatBodyParser:
    """Usage of a whole (non-streamed) chat completion."""

    def __init__(self, request: RequestInfo) -> None:
        self._request = request
        self._body = JsonBodyReader()

    def feed(self, chunk: bytes) -> None:
        self._body.feed(chunk)

    def finish(self) -> MeterResult:
        payload = self._body.finish()
        if payload is None:
            return _estimate(self._request, None, 0, "response body is not a JSON object")
        model = payload.get("model") if isinstance(payload.get("model"), str) else None
        usage = payload.get("usage")
        if isinstance(usage, dict):
            return MeterResult(model or self._request.model, chat_usage_to_units(usage), True)
        output_chars = 0
        for choice in _list(payload.get("choices")):
            output_chars += _count_text_chars(_dict(choice).get("message"))
        return _estimate(self._request, model, output_chars, "response carries no usage")


class ChatStreamParser:
    """Usage of a chat completion stream; the last usage object seen wins."""

    def __init__(self, request: RequestInfo) -> None:
        self._request = request
        self._splitter = SseSplitter()
        self._model: str | None = None
        self._usage: dict[str, Any] | None = None
        self._output_chars = 0
        self._done = False

    def feed(self, chunk: bytes) -> None:
        for event in self._splitter.feed(chunk):
            self._take(event.data)

    def finish(self) -> MeterResult:
        for event in self._splitter.finish():
            self._take(event.data)
        if self._usage is not None:
            return MeterResult(
                self._model or self._request.model, chat_usage_to_units(self._usage), True
            )
        reason = "stream ended without a usage chunk" if self._done else "stream cut short"
        return _estimate(self._request, self._model, self._output_chars, reason)

    def _take(self, data: str) -> None:
        if data.strip() == "[DONE]":
            self._done = True
            return
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(chunk, dict):
            return
        if self._model is None and isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in _list(chunk.get("choices")):
            self._output_chars += _count_text_chars(_dict(choice).get("delta"))


# `"usage":null` as OpenAI writes it in stream chunks (compact JSON). Inside a JSON string a
# quote is always escaped, so these byte sequences can only be structure, never text.
_USAGE_NULL_AFTER = re.compile(rb',"usage":null(?=\s*[,}])')
_USAGE_NULL_BEFORE = re.compile(rb'(?<=\{)"usage":null,')


class UsageChunkRemover:
    """Give the client the chat stream it would have got without `include_usage`.

    Drops the usage-only chunk (`"choices":[]` with a usage object) and removes the
    `"usage":null` member from every other chunk. Every other byte passes unchanged.
    Events are released whole, so a chunk may be held until its closing blank line arrives.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._event_start = 0

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        output: list[bytes] = []
        start = self._event_start
        while True:
            end, next_start = find_line_end(self._buffer, start)
            if end < 0:
                break
            if end == start:  # a blank line closes the event
                output.append(_rewrite_event(self._buffer[:next_start]))
                self._buffer = self._buffer[next_start:]
                start = 0
            else:
                start = next_start
        self._event_start = start
        return b"".join(output)

    def finish(self) -> bytes:
        rest, self._buffer, self._event_start = self._buffer, b"", 0
        return _rewrite_event(rest) if rest else b""


def _rewrite_event(raw: bytes) -> bytes:
    if b'"usage":' not in raw:
        return raw
    lines = raw.splitlines(keepends=True)
    rewritten: list[bytes] = []
    for line in lines:
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if _is_usage_only_chunk(payload):
                return b""
            line = _USAGE_NULL_BEFORE.sub(b"", _USAGE_NULL_AFTER.sub(b"", line))
        rewritten.append(line)
    return b"".join(rewritten)


def _is_usage_only_chunk(payload: bytes) -> bool:
    if b'"usage":null' in payload:
        return False
    try:
        chunk = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(chunk, dict)
        and isinstance(chunk.get("usage"), dict)
        and not chunk.get("choices")
    )


def _estimate(
    request: RequestInfo, model: str | None, output_chars: int, reason: str
) -> MeterResult:
    units = Units(
        input_tokens=request.estimate.input_tokens,
        output_tokens=estimate_tokens_from_chars(output_chars),
    )
    return MeterResult(model or request.model, units, False, reason)


def _output_cap(payload: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_OUTPUT_TOKENS


def _count_text_chars(value: Any, depth: int = 0) -> int:
    """Count the characters of text in messages or deltas, skipping base64 media fields."""
    if depth > 20:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_count_text_chars(item, depth + 1) for item in value)
    if isinstance(value, dict):
        total = 0
        for key, item in value.items():
            if key in ("content", "text", "refusal", "arguments", "name", "tool_calls", "function"):
                total += _count_text_chars(item, depth + 1)
        return total
    return 0


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int) and value > 0:
        return value
    return 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

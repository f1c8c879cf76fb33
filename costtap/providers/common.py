"""Building blocks shared by the provider modules: safe JSON access and parser shapes.

Every helper here tolerates any input: a field of the wrong type reads as empty or zero,
never as an exception.
"""

from __future__ import annotations

import contextlib
import json
import re
from abc import ABC, abstractmethod
from typing import Any

from costtap.providers.base import MeterResult, RequestInfo, Units, estimate_tokens_from_chars
from costtap.providers.jsonbody import JsonBodyReader
from costtap.providers.sse import SseSplitter

# Keys whose string values are text a model reads or writes. Other keys (ids, roles, base64
# media, URLs) are not counted in estimates.
TEXT_KEYS = frozenset(
    {"content", "text", "refusal", "arguments", "name", "tool_calls", "function", "parts", "input"}
)
_MAX_DEPTH = 32


def as_int(value: Any) -> int:
    """Return `value` as a non-negative int; anything else (bool, str, None) is 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, float) and value > 0 and value.is_integer():
        return int(value)
    return 0


def as_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return 0.0
    return float(value) if value > 0 else 0.0


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def count_text_chars(value: Any, depth: int = 0) -> int:
    """Count the characters of text in a message structure, skipping media and ids."""
    if depth > _MAX_DEPTH:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(count_text_chars(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return sum(
            count_text_chars(item, depth + 1) for key, item in value.items() if key in TEXT_KEYS
        )
    return 0


# Tokens a chat API adds around each message (role and separators), and once to prime the
# reply: OpenAI's published counting recipe for gpt-4o-class models uses 3 per message plus 3,
# so 4 per message leaves room for names and tool calls. An estimate, used only before a call.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


def estimate_chat_input(messages: Any, *extra: Any) -> int:
    """Estimate a chat request's input tokens: text, message framing, and tool definitions.

    `extra` contains other parts billed as input (a system prompt, tool schemas), counted at
    4 characters a token over their JSON text.
    """
    count = len(messages) if isinstance(messages, list) else 0
    framing = count * TOKENS_PER_MESSAGE + (TOKENS_PER_REPLY if count else 0)
    chars = count_text_chars(messages)
    for part in extra:
        if isinstance(part, str):
            chars += len(part)
        elif part is not None:
            chars += len(json.dumps(part, separators=(",", ":")))
    return estimate_tokens_from_chars(chars) + framing


def multipart_field(body: bytes, name: str) -> str | None:
    """Return a short text field of a multipart/form-data body, such as the model."""
    marker = b'name="' + name.encode() + b'"'
    start = body.find(marker)
    if start < 0:
        return None
    value_start = body.find(b"\r\n\r\n", start)
    if value_start < 0:
        return None
    value_end = body.find(b"\r\n", value_start + 4)
    if value_end < 0 or value_end - value_start > 260:
        return None
    return body[value_start + 4 : value_end].decode("utf-8", "replace").strip() or None


def query_parameters(query: str) -> dict[str, str]:
    """Split a query string into its parameters, as sent (no percent-decoding)."""
    return dict(pair.partition("=")[::2] for pair in query.split("&") if pair)


def load_json_object(body: bytes) -> dict[str, Any] | None:
    """Parse a request body; return None unless it is a JSON object."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def estimated(
    request: RequestInfo, model: str | None, output_chars: int, reason: str
) -> MeterResult:
    """Build an estimate: the request's input estimate and the output text seen so far."""
    units = Units(
        input_tokens=request.estimate.input_tokens,
        output_tokens=estimate_tokens_from_chars(output_chars),
        chars=request.estimate.chars,
    )
    return MeterResult(model or request.model, units, False, reason)


class JsonResponseParser(ABC):
    """A whole JSON response body, read once it has arrived."""

    def __init__(self, request: RequestInfo) -> None:
        self.request = request
        self._body = JsonBodyReader()

    def feed(self, chunk: bytes) -> None:
        self._body.feed(chunk)

    def finish(self) -> MeterResult:
        payload = self._body.finish()
        if payload is None:
            return estimated(self.request, None, 0, "response body is not a JSON object")
        return self.read(payload)

    @abstractmethod
    def read(self, payload: dict[str, Any]) -> MeterResult: ...


class SseJsonParser(ABC):
    """A Server-Sent Events stream whose data fields are JSON objects."""

    def __init__(self, request: RequestInfo) -> None:
        self.request = request
        self.done = False
        self._splitter = SseSplitter()

    def feed(self, chunk: bytes) -> None:
        for event in self._splitter.feed(chunk):
            self._dispatch(event.event, event.data)

    def finish(self) -> MeterResult:
        for event in self._splitter.finish():
            self._dispatch(event.event, event.data)
        return self.result()

    def _dispatch(self, name: str, data: str) -> None:
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            return
        if isinstance(value, dict):
            self.take(name, value)

    @abstractmethod
    def take(self, name: str, event: dict[str, Any]) -> None: ...

    @abstractmethod
    def result(self) -> MeterResult: ...


class IgnoredBodyParser:
    """A response whose body carries no usage (audio, for one): the request decides."""

    def __init__(self, result: MeterResult) -> None:
        self._result = result

    def feed(self, chunk: bytes) -> None:
        return None

    def finish(self) -> MeterResult:
        return self._result


_SIGNIFICANT = re.compile(rb'[\[\]{}"\\]')
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


class JsonArrayStreamSplitter:
    """Split a JSON array that arrives in pieces into its elements, as each one completes.

    Gemini's streamGenerateContent without `alt=sse` sends `[{...},\\r\\n{...}]`. The
    splitter tracks nesting and strings, jumping between the bytes that matter, so it cuts
    each top-level element without parsing it and keeps the unfinished one between calls.
    """

    def __init__(self, max_element_bytes: int = 16 * 1024 * 1024) -> None:
        self._max_element_bytes = max_element_bytes
        self._pending = bytearray()  # the start of an element cut by a chunk boundary
        self._depth = 0  # nesting inside the current element; 0 between elements
        self._started = False  # the array's opening bracket was seen
        self._in_string = False
        self._escaped = False  # the previous chunk ended with a backslash inside a string

    def feed(self, chunk: bytes) -> list[Any]:
        elements: list[Any] = []
        element_start = 0
        skip_index = 0 if self._escaped else -1
        self._escaped = False
        for match in _SIGNIFICANT.finditer(chunk):
            index = match.start()
            if index == skip_index:
                continue
            byte = chunk[index]
            if self._in_string:
                if byte == _BACKSLASH:
                    skip_index = index + 1
                    self._escaped = skip_index == len(chunk)
                elif byte == _QUOTE:
                    self._in_string = False
                continue
            if not self._started:
                self._started = byte == ord("[")
                continue
            if byte == _QUOTE:
                self._in_string = self._depth > 0
            elif byte in _OPEN:
                if self._depth == 0:
                    element_start = index
                self._depth += 1
            elif byte in _CLOSE and self._depth > 0:
                self._depth -= 1
                if self._depth == 0:
                    self._emit(bytes(self._pending) + chunk[element_start : index + 1], elements)
                    self._pending = bytearray()
        if self._depth > 0:
            self._pending += chunk[element_start:]
            if len(self._pending) > self._max_element_bytes:
                self._pending = bytearray()
                self._depth = 0
                self._in_string = False
                self._escaped = False
        return elements

    @staticmethod
    def _emit(raw: bytes, elements: list[Any]) -> None:
        # A malformed element is skipped: its usage is lost, the stream goes on.
        with contextlib.suppress(ValueError, RecursionError):
            elements.append(json.loads(raw))


def google_error_body(message: str) -> bytes:
    """Return an error in the shape Google APIs use (`error.code`, `.message`, `.status`)."""
    error = {"code": 402, "message": message, "status": "RESOURCE_EXHAUSTED"}
    return json.dumps({"error": error}).encode()

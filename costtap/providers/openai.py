"""OpenAI and Azure OpenAI: which calls are metered and how their usage is read.

Wire facts this module relies on (OpenAI API reference):

- Chat and legacy completions: `usage.prompt_tokens` counts every input token, and
  `prompt_tokens_details.cached_tokens`, `.cache_write_tokens` and `.audio_tokens` are parts
  of it. `usage.completion_tokens` counts every output token, and
  `completion_tokens_details.reasoning_tokens` and `.audio_tokens` are parts of it.
- Responses: `usage.input_tokens` with `input_tokens_details.cached_tokens`, and
  `usage.output_tokens` with `output_tokens_details.reasoning_tokens`. A stream carries
  usage in its `response.completed`, `response.incomplete` or `response.failed` event.
- The response's `model` is the dated model that served the call (`gpt-4o-2024-08-06`),
  while the request names an alias (`gpt-4o`).
- A chat stream carries usage only when the request sets `stream_options.include_usage`.
  Then every chunk gets `"usage":null` and one extra chunk with `"choices":[]` and the
  usage comes last, before `data: [DONE]`.
- Audio speech bills the characters of `input`; with `stream_format: "sse"` the
  `speech.audio.done` event carries token usage. Transcriptions and translations report
  `usage.type` `duration` (billed seconds) or `tokens`.
- Images report token usage (gpt-image-1) or none (dall-e): then each image in `data` counts.
- Azure OpenAI serves the same bodies under `/openai/deployments/{deployment}/...` and
  `/openai/v1/...`, on `{resource}.openai.azure.com` and `{resource}.cognitiveservices.azure.com`.

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
    estimate_tokens_from_chars,
    media_type,
)
from costtap.providers.ceiling import text_request_ceiling
from costtap.providers.common import (
    IgnoredBodyParser,
    JsonResponseParser,
    SseJsonParser,
    as_dict,
    as_int,
    as_list,
    as_number,
    as_str,
    count_text_chars,
    estimate_chat_input,
    estimated,
    load_json_object,
    multipart_field,
    query_parameters,
)
from costtap.providers.sse import find_line_end

OPENAI = "openai"
AZURE = "azure-openai"

CHAT_COMPLETIONS = "chat.completions"
COMPLETIONS = "completions"
RESPONSES = "responses"
EMBEDDINGS = "embeddings"
AUDIO_SPEECH = "audio.speech"
AUDIO_TRANSCRIPTIONS = "audio.transcriptions"
AUDIO_TRANSLATIONS = "audio.translations"
IMAGES = "images"

# Output tokens assumed for an estimate when the request sets no output cap.
DEFAULT_OUTPUT_TOKENS = 1024

_AZURE_HOST = re.compile(r"[a-z0-9-]+\.(?:openai\.azure\.com|cognitiveservices\.azure\.com)")

# Paid endpoints, by method and the path after the version prefix.
_METERED: dict[tuple[str, str], str] = {
    ("POST", "chat/completions"): CHAT_COMPLETIONS,
    ("POST", "completions"): COMPLETIONS,
    ("POST", "responses"): RESPONSES,
    ("POST", "embeddings"): EMBEDDINGS,
    ("POST", "audio/speech"): AUDIO_SPEECH,
    ("POST", "audio/transcriptions"): AUDIO_TRANSCRIPTIONS,
    ("POST", "audio/translations"): AUDIO_TRANSLATIONS,
    ("POST", "images/generations"): IMAGES,
    ("POST", "images/edits"): IMAGES,
    ("POST", "images/variations"): IMAGES,
}
# Calls that cost nothing themselves: counting, moderation, listings, files, batch objects.
_FREE_PREFIXES = (
    "models",
    "files",
    "uploads",
    "batches",
    "moderations",
    "vector_stores",
    "responses/input_tokens",
)

_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/([^/]+)/(.+)$")


def _split_path(path: str) -> tuple[str, str | None] | None:
    """Return (path after the version prefix, Azure deployment) or None for other paths."""
    path_only = path.split("?", 1)[0].rstrip("/")
    if match := _DEPLOYMENT_PATH.match(path_only):
        return match.group(2), match.group(1)
    for prefix in ("/v1/", "/openai/v1/"):
        if path_only.startswith(prefix):
            return path_only[len(prefix) :], None
    return None


class OpenAIProvider:
    name: str = OPENAI
    host_patterns: tuple[str, ...] = (r"api\.openai\.com", _AZURE_HOST.pattern)

    def match(self, host: str, method: str, path: str) -> Route | None:
        provider = AZURE if _AZURE_HOST.fullmatch(host) else OPENAI
        split = _split_path(path)
        if split is None:
            return None
        rest, deployment = split
        if endpoint := _METERED.get((method, rest)):
            return Route(provider, endpoint, path_model=deployment)
        if method == "GET" or rest.startswith(_FREE_PREFIXES):
            return Route(provider, rest.split("/", 1)[0], free=True)
        return None

    def read_request(self, route: Route, body: bytes, headers: Mapping[str, str]) -> RequestInfo:
        if route.endpoint in (CHAT_COMPLETIONS, COMPLETIONS):
            info = read_chat_request(body)
        elif route.endpoint in (AUDIO_TRANSCRIPTIONS, AUDIO_TRANSLATIONS) or (
            route.endpoint == IMAGES and media_type(headers) == "multipart/form-data"
        ):
            info = RequestInfo(model=multipart_field(body, "model"))
        else:
            info = _read_json_request(route, body)
        if info.model is None:
            info.model = route.path_model
        return info

    def response_parser(
        self, route: Route, request: RequestInfo, headers: Mapping[str, str]
    ) -> ResponseParser:
        streaming = media_type(headers) == "text/event-stream"
        if route.endpoint == RESPONSES:
            return ResponsesStreamParser(request) if streaming else ResponsesBodyParser(request)
        if route.endpoint == AUDIO_SPEECH:
            if streaming:
                return SpeechStreamParser(request)
            return IgnoredBodyParser(
                MeterResult(request.model, Units(chars=request.estimate.chars), True)
            )
        if route.endpoint in (AUDIO_TRANSCRIPTIONS, AUDIO_TRANSLATIONS):
            return (
                TranscriptionStreamParser(request)
                if streaming
                else TranscriptionBodyParser(request)
            )
        if route.endpoint == IMAGES:
            return ImagesStreamParser(request) if streaming else ImagesBodyParser(request)
        return ChatStreamParser(request) if streaming else ChatBodyParser(request)

    def deny_body(self, message: str) -> bytes:
        # OpenAI's error object; SDKs raise it with the message.
        error = {
            "message": message,
            "type": "insufficient_quota",
            "param": None,
            "code": "budget_exceeded",
        }
        return json.dumps({"error": error}).encode()

    def client_filter(self, route: Route) -> UsageChunkRemover | None:
        if route.endpoint in (CHAT_COMPLETIONS, COMPLETIONS):
            return UsageChunkRemover()
        return None


def read_chat_request(body: bytes) -> RequestInfo:
    """Read model, stream flag and estimate, and ask for stream usage if the client did not."""
    payload = load_json_object(body)
    if payload is None:
        return RequestInfo()

    info = RequestInfo(
        model=as_str(payload.get("model")),
        streaming=payload.get("stream") is True,
        estimate=Units(
            input_tokens=estimate_chat_input(
                payload.get("messages"), payload.get("tools"), payload.get("functions")
            )
            + estimate_tokens_from_chars(count_text_chars(payload.get("prompt"))),
            output_tokens=_output_cap(payload),
        ),
        output_is_default=_output_cap_missing(payload),
        ceiling=_token_ceiling(body, payload),
    )

    stream_options = payload.get("stream_options")
    usage_requested = (
        isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    )
    if info.streaming and not usage_requested:
        options = dict(stream_options) if isinstance(stream_options, dict) else {}
        options["include_usage"] = True
        payload["stream_options"] = options
        info.upstream_body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        info.hide_usage_from_client = True
    return info


def _read_json_request(route: Route, body: bytes) -> RequestInfo:
    payload = load_json_object(body)
    if payload is None:
        return RequestInfo()
    text_chars = count_text_chars(payload.get("input")) + count_text_chars(
        payload.get("instructions")
    )
    estimate = Units(input_tokens=estimate_tokens_from_chars(text_chars))
    output_is_default = False
    streaming = payload.get("stream") is True or payload.get("stream_format") == "sse"
    # NOTE: image requests have no ceiling: gpt-image models bill tokens the request cannot bound.
    ceiling: Units | None = None
    if route.endpoint == RESPONSES:
        estimate.output_tokens = _output_cap(payload)
        output_is_default = _output_cap_missing(payload)
        ceiling = _token_ceiling(body, payload)
    elif route.endpoint == EMBEDDINGS:
        ceiling = text_request_ceiling(body, payload, max_output_tokens=0)
    elif route.endpoint == AUDIO_SPEECH:
        text = payload.get("input")
        estimate = Units(chars=len(text) if isinstance(text, str) else 0)
        # Speech is billed by the characters of its input, except a token-billed stream.
        ceiling = None if streaming else estimate
    elif route.endpoint == IMAGES:
        estimate = Units(images=as_int(payload.get("n")) or 1)
    return RequestInfo(
        model=as_str(payload.get("model")),
        streaming=streaming,
        estimate=estimate,
        output_is_default=output_is_default,
        ceiling=ceiling,
    )


def chat_usage_to_units(usage: dict[str, Any]) -> Units:
    """Map a chat or legacy completions `usage` object onto costtap's units."""
    prompt_details = as_dict(usage.get("prompt_tokens_details"))
    completion_details = as_dict(usage.get("completion_tokens_details"))
    return Units(
        input_tokens=as_int(usage.get("prompt_tokens")),
        cached_input_tokens=as_int(prompt_details.get("cached_tokens")),
        cache_write_tokens=as_int(prompt_details.get("cache_write_tokens")),
        audio_input_tokens=as_int(prompt_details.get("audio_tokens")),
        output_tokens=as_int(usage.get("completion_tokens")),
        reasoning_tokens=as_int(completion_details.get("reasoning_tokens")),
        audio_output_tokens=as_int(completion_details.get("audio_tokens")),
    )


def token_usage_to_units(usage: dict[str, Any]) -> Units:
    """Map the `input_tokens`/`output_tokens` usage of Responses, images and audio."""
    input_details = as_dict(usage.get("input_tokens_details")) or as_dict(
        usage.get("input_token_details")
    )
    output_details = as_dict(usage.get("output_tokens_details")) or as_dict(
        usage.get("output_token_details")
    )
    return Units(
        input_tokens=as_int(usage.get("input_tokens")),
        cached_input_tokens=as_int(input_details.get("cached_tokens")),
        audio_input_tokens=as_int(input_details.get("audio_tokens")),
        output_tokens=as_int(usage.get("output_tokens")),
        reasoning_tokens=as_int(output_details.get("reasoning_tokens")),
        audio_output_tokens=as_int(output_details.get("audio_tokens")),
    )


class ChatBodyParser(JsonResponseParser):
    """Usage of a whole chat completion, legacy completion or embeddings response."""

    def read(self, payload: dict[str, Any]) -> MeterResult:
        model = as_str(payload.get("model"))
        usage = payload.get("usage")
        if isinstance(usage, dict):
            return MeterResult(model or self.request.model, chat_usage_to_units(usage), True)
        output_chars = sum(
            count_text_chars(as_dict(choice)) for choice in as_list(payload.get("choices"))
        )
        return estimated(self.request, model, output_chars, "response carries no usage")


class ChatStreamParser(SseJsonParser):
    """Usage of a chat or legacy completion stream; the last usage object seen wins."""

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._model: str | None = None
        self._usage: dict[str, Any] | None = None
        self._output_chars = 0

    def take(self, name: str, event: dict[str, Any]) -> None:
        if self._model is None:
            self._model = as_str(event.get("model"))
        if isinstance(event.get("usage"), dict):
            self._usage = event["usage"]
        for choice in as_list(event.get("choices")):
            self._output_chars += count_text_chars(as_dict(choice).get("delta"))
            self._output_chars += count_text_chars(as_dict(choice).get("text"))

    def result(self) -> MeterResult:
        if self._usage is not None:
            return MeterResult(
                self._model or self.request.model, chat_usage_to_units(self._usage), True
            )
        reason = "stream ended without a usage chunk" if self.done else "stream cut short"
        return estimated(self.request, self._model, self._output_chars, reason)


class ResponsesBodyParser(JsonResponseParser):
    def read(self, payload: dict[str, Any]) -> MeterResult:
        model = as_str(payload.get("model"))
        usage = payload.get("usage")
        if isinstance(usage, dict):
            return MeterResult(model or self.request.model, token_usage_to_units(usage), True)
        output_chars = count_text_chars(payload.get("output"))
        return estimated(self.request, model, output_chars, "response carries no usage")


class ResponsesStreamParser(SseJsonParser):
    """Responses stream: usage arrives in the event that ends the response."""

    _FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._model: str | None = None
        self._usage: dict[str, Any] | None = None
        self._output_chars = 0

    def take(self, name: str, event: dict[str, Any]) -> None:
        kind = as_str(event.get("type")) or name
        response = as_dict(event.get("response"))
        if response:
            self._model = as_str(response.get("model")) or self._model
        if kind in self._FINAL_EVENTS and isinstance(response.get("usage"), dict):
            self._usage = response["usage"]
        elif kind == "response.output_text.delta":
            self._output_chars += len(as_str(event.get("delta")) or "")

    def result(self) -> MeterResult:
        if self._usage is not None:
            return MeterResult(
                self._model or self.request.model, token_usage_to_units(self._usage), True
            )
        return estimated(
            self.request, self._model, self._output_chars, "stream ended without usage"
        )


class SpeechStreamParser(SseJsonParser):
    """Speech with `stream_format: "sse"`: `speech.audio.done` carries token usage."""

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._usage: dict[str, Any] | None = None

    def take(self, name: str, event: dict[str, Any]) -> None:
        if isinstance(event.get("usage"), dict):
            self._usage = event["usage"]

    def result(self) -> MeterResult:
        if self._usage is not None:
            return MeterResult(self.request.model, token_usage_to_units(self._usage), True)
        # Without the final event, the characters of the input are what was billed.
        return MeterResult(self.request.model, Units(chars=self.request.estimate.chars), True)


def transcription_usage_to_units(usage: dict[str, Any]) -> Units | None:
    if usage.get("type") == "duration" or "seconds" in usage:
        return Units(seconds=as_number(usage.get("seconds")))
    if "input_tokens" in usage or "output_tokens" in usage:
        return token_usage_to_units(usage)
    return None


class TranscriptionBodyParser(JsonResponseParser):
    def read(self, payload: dict[str, Any]) -> MeterResult:
        units = transcription_usage_to_units(as_dict(payload.get("usage")))
        if units is not None:
            return MeterResult(self.request.model, units, True)
        duration = as_number(payload.get("duration"))
        if duration:
            return MeterResult(
                self.request.model, Units(seconds=duration), False, "usage missing: duration used"
            )
        # NOTE: text, srt and vtt formats carry no usage or duration: the call has no units.
        return MeterResult(
            self.request.model, Units(), False, "response carries no usage or duration"
        )


class TranscriptionStreamParser(SseJsonParser):
    """Transcription stream: `transcript.text.done` carries the usage."""

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._units: Units | None = None

    def take(self, name: str, event: dict[str, Any]) -> None:
        if isinstance(event.get("usage"), dict):
            self._units = transcription_usage_to_units(event["usage"]) or self._units

    def result(self) -> MeterResult:
        if self._units is not None:
            return MeterResult(self.request.model, self._units, True)
        return MeterResult(self.request.model, Units(), False, "stream ended without usage")


class ImagesBodyParser(JsonResponseParser):
    def read(self, payload: dict[str, Any]) -> MeterResult:
        usage = payload.get("usage")
        if isinstance(usage, dict):
            return MeterResult(self.request.model, token_usage_to_units(usage), True)
        # dall-e models report no usage: they bill per image returned.
        images = len(as_list(payload.get("data")))
        return MeterResult(self.request.model, Units(images=images), True)


class ImagesStreamParser(SseJsonParser):
    """Image generation stream: the `image_generation.completed` event carries usage."""

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._usage: dict[str, Any] | None = None
        self._images = 0

    def take(self, name: str, event: dict[str, Any]) -> None:
        if as_str(event.get("type")) in ("image_generation.completed", "image_edit.completed"):
            self._images += 1
        if isinstance(event.get("usage"), dict):
            self._usage = event["usage"]

    def result(self) -> MeterResult:
        if self._usage is not None:
            return MeterResult(self.request.model, token_usage_to_units(self._usage), True)
        if self._images:
            return MeterResult(self.request.model, Units(images=self._images), True)
        return MeterResult(
            self.request.model, self.request.estimate, False, "stream ended without usage"
        )


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


def _output_cap(payload: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = as_int(payload.get(key))
        if value:
            return value
    return DEFAULT_OUTPUT_TOKENS


REALTIME = "realtime"
_REALTIME_PATHS = ("/v1/realtime", "/openai/realtime", "/openai/v1/realtime")


def match_realtime(host: str, path: str) -> Route | None:
    """Route a WebSocket upgrade to the Realtime API; the model is a query parameter."""
    path_only, _, query = path.partition("?")
    if path_only.rstrip("/") not in _REALTIME_PATHS:
        return None
    provider = AZURE if _AZURE_HOST.fullmatch(host) else OPENAI
    parameters = query_parameters(query)
    model = parameters.get("model") or parameters.get("deployment") or None
    return Route(provider, REALTIME, path_model=model)


class RealtimeMeter:
    """Realtime API: each `response.done` event carries the usage of one response."""

    def __init__(self, route: Route) -> None:
        self._model = route.path_model

    def client_message(self, content: bytes, is_text: bool) -> list[MeterResult]:
        return []

    def server_message(self, content: bytes, is_text: bool) -> list[MeterResult]:
        event = load_json_object(content) if is_text else None
        if event is None:
            return []
        kind = event.get("type")
        if kind in ("session.created", "session.updated"):
            self._model = as_str(as_dict(event.get("session")).get("model")) or self._model
            return []
        if kind != "response.done":
            return []
        usage = as_dict(as_dict(event.get("response")).get("usage"))
        if not usage:
            return [MeterResult(self._model, Units(), False, "response.done carries no usage")]
        return [MeterResult(self._model, token_usage_to_units(usage), True)]

    def finish(self) -> list[MeterResult]:
        return []


def _token_ceiling(body: bytes, payload: dict[str, Any]) -> Units | None:
    """Bound a chat, completion or response request; None without an output cap."""
    if _output_cap_missing(payload):
        return None
    # `best_of` completions are all generated and billed; `n` choices are all returned.
    choices = max(as_int(payload.get("n")), as_int(payload.get("best_of")), 1)
    return text_request_ceiling(body, payload, _output_cap(payload), choices)


def _output_cap_missing(payload: dict[str, Any]) -> bool:
    return not any(
        as_int(payload.get(key))
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens")
    )

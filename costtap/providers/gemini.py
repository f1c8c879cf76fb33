"""Google Gemini API and Vertex AI: which calls are metered and how their usage is read.

Wire facts this module relies on (Gemini API and Vertex AI references):

- The Gemini API (`generativelanguage.googleapis.com`) names the model in the path:
  `/v1beta/models/{model}:{method}`, also under `/v1/` and `/v1alpha/`. Vertex AI
  (`aiplatform.googleapis.com` and `{region}-aiplatform.googleapis.com`) uses
  `/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:{method}`,
  or `/v1/publishers/google/models/{model}:{method}` in express mode.
- `usageMetadata` of a generate response: `promptTokenCount` counts every prompt token,
  and `cachedContentTokenCount` is a part of it. `toolUsePromptTokenCount` (the results of
  built-in tools such as Google Search) is billed as input but is not in the prompt count.
  `candidatesTokenCount` counts the generated candidates. `thoughtsTokenCount` counts
  thinking, which is billed as output but is not in the candidates count. `promptTokensDetails` and
  `candidatesTokensDetails` split the counts by modality (TEXT, AUDIO, IMAGE, VIDEO).
- `modelVersion` names the model that served the call; the path may name an alias such as
  `gemini-flash-latest`.
- `:streamGenerateContent` repeats a running total in the `usageMetadata` of every chunk,
  and the prompt count can change between chunks: the last one counts. With `?alt=sse`
  the chunks are SSE `data:` events; without it the body is one JSON array written element
  by element. The last chunk of a complete stream carries a `finishReason`.
- Embedding responses of the Gemini API (`:embedContent`, `:batchEmbedContents`) carry no
  usage in the recordings, so they are estimated from the request's text unless a
  `usageMetadata` object appears. Vertex AI's `:predict` reports
  `metadata.billableCharacterCount` and a `statistics.token_count` for each embedding.
- Creating a context cache (`POST .../cachedContents`) reports the size of the cached
  content in `usageMetadata.totalTokenCount`.
- Request bodies follow the protocol buffer JSON mapping, which accepts field names in
  lowerCamelCase and in snake_case alike.

Pure code: no mitmproxy, no I/O, and no parser method raises on malformed input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from costtap.providers.base import (
    ClientStreamFilter,
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
    JsonArrayStreamSplitter,
    JsonResponseParser,
    SseJsonParser,
    as_dict,
    as_int,
    as_list,
    as_str,
    count_text_chars,
    estimated,
    google_error_body,
    load_json_object,
)
from costtap.providers.jsonbody import TAIL_BYTES

GEMINI = "gemini"
VERTEX = "vertex-ai"

GENERATE = "generateContent"
STREAM_GENERATE = "streamGenerateContent"
EMBED = "embedContent"
BATCH_EMBED = "batchEmbedContents"
PREDICT = "predict"
COUNT_TOKENS = "countTokens"
COMPUTE_TOKENS = "computeTokens"
CACHE_CREATE = "cachedContents.create"

# Output tokens assumed for an estimate when the request sets no output cap.
DEFAULT_OUTPUT_TOKENS = 1024

_METERED_METHODS = frozenset({GENERATE, STREAM_GENERATE, EMBED, BATCH_EMBED, PREDICT})
_FREE_METHODS = frozenset({COUNT_TOKENS, COMPUTE_TOKENS})
_EMBED_ENDPOINTS = frozenset({EMBED, BATCH_EMBED})

_VERSION = r"v\d+(?:alpha|beta)?\d*"
_MODEL_METHOD = r"([^/:]+):([A-Za-z]+)"
_STUDIO_MODEL_PATH = re.compile(rf"/{_VERSION}/(?:models|tunedModels)/{_MODEL_METHOD}")
_STUDIO_CACHE_PATH = re.compile(rf"/{_VERSION}/cachedContents")
_VERTEX_MODEL_PATH = re.compile(
    rf"/{_VERSION}/(?:projects/[^/]+/locations/[^/]+/)?publishers/google/models/{_MODEL_METHOD}"
)
_VERTEX_CACHE_PATH = re.compile(rf"/{_VERSION}/projects/[^/]+/locations/[^/]+/cachedContents")
# Path segments that only locate a resource. The first other segment names a free GET.
_LOCATOR_SEGMENTS = frozenset({"projects", "locations", "publishers"})

# The keys of `usageMetadata` that hold token counts. An object without any of them (only
# `trafficType`, say) is not a usage report.
_COUNT_KEYS = (
    "promptTokenCount",
    "candidatesTokenCount",
    "totalTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "toolUsePromptTokenCount",
)
# JsonBodyReader keeps only the head and tail of a large body. `usageMetadata` and
# `modelVersion` follow the candidates, so they are recovered from the tail.
_USAGE_METADATA_KEY = re.compile(rb'"usageMetadata"\s*:\s*\{')
_MODEL_VERSION_KEY = re.compile(rb'"modelVersion"\s*:\s*"([^"\\]{1,200})"')


class _GoogleModelsProvider:
    """The shared shape of Gemini on AI Studio and on Vertex AI: only hosts and paths differ."""

    name: str
    host_patterns: tuple[str, ...]
    _model_path: re.Pattern[str]
    _cache_path: re.Pattern[str]

    def match(self, host: str, method: str, path: str) -> Route | None:
        return _match(self.name, self._model_path, self._cache_path, method, path)

    def read_request(self, route: Route, body: bytes, headers: Mapping[str, str]) -> RequestInfo:
        return read_request(route, body)

    def response_parser(
        self, route: Route, request: RequestInfo, headers: Mapping[str, str]
    ) -> ResponseParser:
        return response_parser(route, request, headers)

    def deny_body(self, message: str) -> bytes:
        return google_error_body(message)

    def client_filter(self, route: Route) -> ClientStreamFilter | None:
        return None


class GeminiProvider(_GoogleModelsProvider):
    """The Gemini API of Google AI Studio, on generativelanguage.googleapis.com."""

    name: str = GEMINI
    host_patterns: tuple[str, ...] = (r"generativelanguage\.googleapis\.com",)
    _model_path = _STUDIO_MODEL_PATH
    _cache_path = _STUDIO_CACHE_PATH


class VertexProvider(_GoogleModelsProvider):
    """Gemini models on Vertex AI, on the global and the regional aiplatform hosts."""

    name: str = VERTEX
    host_patterns: tuple[str, ...] = (
        r"aiplatform\.googleapis\.com",
        r"[a-z0-9-]+-aiplatform\.googleapis\.com",
    )
    _model_path = _VERTEX_MODEL_PATH
    _cache_path = _VERTEX_CACHE_PATH


def _match(
    provider: str,
    model_path: re.Pattern[str],
    cache_path: re.Pattern[str],
    method: str,
    path: str,
) -> Route | None:
    path_only = path.split("?", 1)[0].rstrip("/").replace("%3A", ":").replace("%3a", ":")
    method = method.upper()
    model_match = model_path.fullmatch(path_only)
    model = model_match.group(1) if model_match else None
    if method == "GET":
        return Route(provider, _free_endpoint(path_only), free=True, path_model=model)
    if method != "POST":
        return None
    if model_match is not None:
        action = model_match.group(2)
        if action in _METERED_METHODS:
            return Route(provider, action, path_model=model)
        if action in _FREE_METHODS:
            return Route(provider, action, free=True, path_model=model)
        return None
    if cache_path.fullmatch(path_only):
        return Route(provider, CACHE_CREATE)
    return None


def _free_endpoint(path_only: str) -> str:
    """Name a GET by the collection it reads: `models`, `cachedContents`, `files`."""
    segments = [segment for segment in path_only.split("/") if segment]
    if segments and re.fullmatch(_VERSION, segments[0]):
        segments = segments[1:]
    index = 0
    while index < len(segments) and segments[index] in _LOCATOR_SEGMENTS:
        index += 2  # skip the locator and the name that follows it
    if index < len(segments):
        return segments[index].split(":", 1)[0] or "get"
    return "get"


def read_request(route: Route, body: bytes) -> RequestInfo:
    """Read the model and an estimate. The stream flag comes from the path."""
    info = RequestInfo(model=route.path_model, streaming=route.endpoint == STREAM_GENERATE)
    payload = load_json_object(body)
    if payload is None or route.free:
        return info
    if route.endpoint in _EMBED_ENDPOINTS:
        text_chars = count_text_chars(_field(payload, "content")) + count_text_chars(
            as_list(payload.get("requests"))
        )
        info.estimate = Units(input_tokens=estimate_tokens_from_chars(text_chars))
        info.ceiling = text_request_ceiling(body, payload, max_output_tokens=0)
    elif route.endpoint == PREDICT:
        instances = as_list(payload.get("instances"))
        info.estimate = Units(
            input_tokens=estimate_tokens_from_chars(count_text_chars(instances)),
            chars=_billable_chars(instances),
        )
    elif route.endpoint == CACHE_CREATE:
        info.model = _short_model_name(as_str(payload.get("model"))) or info.model
        info.estimate = Units(input_tokens=estimate_tokens_from_chars(_prompt_chars(payload)))
    else:
        info.estimate = Units(
            input_tokens=estimate_tokens_from_chars(_prompt_chars(payload)),
            output_tokens=_output_cap(payload),
        )
        config = as_dict(_field(payload, "generationConfig"))
        cap = as_int(_field(config, "maxOutputTokens"))
        info.output_is_default = not cap
        if cap:
            # The cap includes thinking tokens; every candidate is billed.
            candidates = as_int(_field(config, "candidateCount")) or 1
            info.ceiling = text_request_ceiling(body, payload, cap, candidates)
    return info


def response_parser(
    route: Route, request: RequestInfo, headers: Mapping[str, str]
) -> ResponseParser:
    if route.free:
        return IgnoredBodyParser(MeterResult(request.model, Units(), True))
    if route.endpoint == STREAM_GENERATE:
        if media_type(headers) == "text/event-stream":
            return GenerateSseParser(request)
        return GenerateArrayParser(request)
    if route.endpoint in _EMBED_ENDPOINTS:
        return EmbedBodyParser(request)
    if route.endpoint == PREDICT:
        return PredictBodyParser(request)
    if route.endpoint == CACHE_CREATE:
        return CacheCreateParser(request)
    return GenerateBodyParser(request)


def usage_to_units(usage: dict[str, Any]) -> Units:
    """Map a `usageMetadata` object onto costtap's units.

    NOTE: cached audio tokens count in both `cached_input_tokens` and `audio_input_tokens`,
    because Units has no field for cached audio.
    """
    input_tokens = as_int(usage.get("promptTokenCount")) + as_int(
        usage.get("toolUsePromptTokenCount")
    )
    thoughts = as_int(usage.get("thoughtsTokenCount"))
    output_tokens = as_int(usage.get("candidatesTokenCount")) + thoughts
    audio_input = _modality_tokens(usage.get("promptTokensDetails"), "AUDIO") + _modality_tokens(
        usage.get("toolUsePromptTokensDetails"), "AUDIO"
    )
    audio_output = _modality_tokens(usage.get("candidatesTokensDetails"), "AUDIO")
    # Parts never exceed their totals, even when the details disagree with the counts.
    return Units(
        input_tokens=input_tokens,
        cached_input_tokens=min(as_int(usage.get("cachedContentTokenCount")), input_tokens),
        audio_input_tokens=min(audio_input, input_tokens),
        output_tokens=output_tokens,
        reasoning_tokens=thoughts,
        audio_output_tokens=min(audio_output, output_tokens),
    )


def _has_counts(usage: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(usage, dict) and any(key in usage for key in _COUNT_KEYS)


def _modality_tokens(details: Any, modality: str) -> int:
    return sum(
        as_int(as_dict(item).get("tokenCount"))
        for item in as_list(details)
        if as_dict(item).get("modality") == modality
    )


def _candidate_chars(candidates: Any) -> int:
    """Count the text of the candidates' parts, thoughts included, because both are billed."""
    return sum(
        count_text_chars(as_list(as_dict(as_dict(candidate).get("content")).get("parts")))
        for candidate in as_list(candidates)
    )


def _finished(event: dict[str, Any]) -> bool:
    """Return True when a chunk ends its response: a finish reason or a blocked prompt."""
    if as_dict(event.get("promptFeedback")).get("blockReason"):
        return True
    return any(
        as_str(as_dict(candidate).get("finishReason"))
        for candidate in as_list(event.get("candidates"))
    )


class GenerateBodyParser(JsonResponseParser):
    """Reader of a whole generateContent response."""

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._tail = _TailBuffer(TAIL_BYTES)

    def feed(self, chunk: bytes) -> None:
        super().feed(chunk)
        self._tail.feed(chunk)

    def finish(self) -> MeterResult:
        if self._body.truncated:
            # The candidates (inline images, say) were too large to keep whole.
            return self.read(_recover_from_tail(self._tail.value()))
        return super().finish()

    def read(self, payload: dict[str, Any]) -> MeterResult:
        model = as_str(payload.get("modelVersion"))
        usage = payload.get("usageMetadata")
        if _has_counts(usage):
            return MeterResult(model or self.request.model, usage_to_units(usage), True)
        output_chars = _candidate_chars(payload.get("candidates"))
        return estimated(self.request, model, output_chars, "response carries no usage")


class _GenerateStream:
    """Running state of a generate stream, shared by its SSE and JSON array forms."""

    def __init__(self, request: RequestInfo) -> None:
        self.request = request
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.output_chars = 0
        self.finished = False

    def take(self, event: dict[str, Any]) -> None:
        self.model = as_str(event.get("modelVersion")) or self.model
        usage = event.get("usageMetadata")
        if _has_counts(usage):
            # A running total: the last one replaces the ones before it.
            self.usage = usage
        self.output_chars += _candidate_chars(event.get("candidates"))
        self.finished = self.finished or _finished(event)

    def result(self) -> MeterResult:
        model = self.model or self.request.model
        if self.usage is not None:
            units = usage_to_units(self.usage)
            if self.finished:
                return MeterResult(model, units, True)
            # The running total of a cut stream is a lower bound of what was billed.
            return MeterResult(model, units, False, "stream cut short: last running usage")
        reason = "stream ended without usage" if self.finished else "stream cut short"
        return estimated(self.request, self.model, self.output_chars, reason)


class GenerateSseParser(SseJsonParser):
    """Reader of a streamGenerateContent response with `alt=sse`."""

    def __init__(self, request: RequestInfo) -> None:
        super().__init__(request)
        self._stream = _GenerateStream(request)

    def take(self, name: str, event: dict[str, Any]) -> None:
        self._stream.take(event)

    def result(self) -> MeterResult:
        return self._stream.result()


class GenerateArrayParser:
    """Reader of a streamGenerateContent response without `alt=sse`, a JSON array.

    NOTE: JsonArrayStreamSplitter and SseSplitter drop an element over 16 MiB (a large inline
    image) with its usage. The running total of a later element still counts.
    """

    def __init__(self, request: RequestInfo) -> None:
        self.request = request
        self._splitter = JsonArrayStreamSplitter()
        self._stream = _GenerateStream(request)

    def feed(self, chunk: bytes) -> None:
        for element in self._splitter.feed(chunk):
            if isinstance(element, dict):
                self._stream.take(element)

    def finish(self) -> MeterResult:
        return self._stream.result()


class EmbedBodyParser(JsonResponseParser):
    """Reader of embedContent and batchEmbedContents, estimated unless usage appears."""

    def read(self, payload: dict[str, Any]) -> MeterResult:
        usage = payload.get("usageMetadata")
        if _has_counts(usage):
            return MeterResult(self.request.model, usage_to_units(usage), True)
        return estimated(self.request, None, 0, "embedding responses carry no usage")


class PredictBodyParser(JsonResponseParser):
    """Reader of Vertex AI `:predict`: embeddings report characters and tokens."""

    def read(self, payload: dict[str, Any]) -> MeterResult:
        metadata = as_dict(payload.get("metadata"))
        tokens = 0
        has_statistics = False
        images = 0
        for item in as_list(payload.get("predictions")):
            prediction = as_dict(item)
            statistics = as_dict(as_dict(prediction.get("embeddings")).get("statistics"))
            if "token_count" in statistics:
                has_statistics = True
                tokens += as_int(statistics.get("token_count"))
            if as_str(prediction.get("bytesBase64Encoded")) or as_str(prediction.get("gcsUri")):
                images += 1
        if has_statistics or "billableCharacterCount" in metadata:
            units = Units(input_tokens=tokens, chars=as_int(metadata.get("billableCharacterCount")))
            return MeterResult(self.request.model, units, True)
        if images:
            # Image models (Imagen) bill by the image, and each image is one prediction.
            return MeterResult(self.request.model, Units(images=images), True)
        return estimated(self.request, None, 0, "response carries no usage")


class CacheCreateParser(JsonResponseParser):
    """Reader of a context cache creation, whose cached tokens are billed as input."""

    def read(self, payload: dict[str, Any]) -> MeterResult:
        model = _short_model_name(as_str(payload.get("model")))
        usage = as_dict(payload.get("usageMetadata"))
        if "totalTokenCount" in usage:
            units = Units(input_tokens=as_int(usage.get("totalTokenCount")))
            return MeterResult(model or self.request.model, units, True)
        return estimated(self.request, model, 0, "response carries no usage")


class _TailBuffer:
    """Buffer of the last `limit` bytes of a body, kept with amortized copying."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > 2 * self._limit:
            tail = b"".join(self._chunks)[-self._limit :]
            self._chunks = [tail]
            self._size = len(tail)

    def value(self) -> bytes:
        return b"".join(self._chunks)[-self._limit :]


def _recover_from_tail(tail: bytes) -> dict[str, Any]:
    """Find the top-level `usageMetadata` and `modelVersion` at the end of a large body."""
    recovered: dict[str, Any] = {}
    if models := list(_MODEL_VERSION_KEY.finditer(tail)):
        recovered["modelVersion"] = models[-1].group(1).decode("utf-8", "replace")
    # The last match is the top-level object: it follows every candidate.
    for match in reversed(list(_USAGE_METADATA_KEY.finditer(tail))):
        text = tail[match.end() - 1 :].decode("utf-8", "replace")
        try:
            usage, _ = json.JSONDecoder().raw_decode(text)
        except (ValueError, RecursionError):
            continue
        recovered["usageMetadata"] = usage
        break
    return recovered


def _field(payload: dict[str, Any], name: str) -> Any:
    """Read a request field by its lowerCamelCase name or its snake_case name."""
    if name in payload:
        return payload[name]
    return payload.get(re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower())


def _prompt_chars(payload: dict[str, Any]) -> int:
    return count_text_chars(as_list(_field(payload, "contents"))) + count_text_chars(
        as_dict(_field(payload, "systemInstruction"))
    )


def _output_cap(payload: dict[str, Any]) -> int:
    config = as_dict(_field(payload, "generationConfig"))
    return as_int(_field(config, "maxOutputTokens")) or DEFAULT_OUTPUT_TOKENS


def _billable_chars(instances: Iterable[Any]) -> int:
    """Count the characters of the texts to embed, without white space.

    This is an estimate of `billableCharacterCount`: the recorded call bills 12 characters
    for "Hello, world!", which is 13 characters with its space.
    """
    total = 0
    for instance in instances:
        text = as_str(as_dict(instance).get("content"))
        if text is not None:
            total += sum(1 for char in text if not char.isspace())
    return total


def _short_model_name(name: str | None) -> str | None:
    """Shorten `models/gemini-2.5-flash` or a Vertex AI resource name to the model name."""
    if name is None:
        return None
    return name.rsplit("/", 1)[-1] or None

"""The Gemini API and Vertex AI provider module on its own: routes, requests, bodies, streams."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costtap.providers import jsonbody
from costtap.providers.base import MeterResult, Provider, RequestInfo, Route, Units
from costtap.providers.decoding import make_decoder
from costtap.providers.gemini import GeminiProvider, VertexProvider
from tests.support.corpus import Case, cases

GEMINI = GeminiProvider()
VERTEX = VertexProvider()
# Typed as the protocol, so mypy checks that both classes implement it.
PROVIDERS: tuple[Provider, ...] = (GEMINI, VERTEX)

CORPUS_CASES = [
    case
    for case in cases("gemini") + cases("vertex")
    if not case.name.startswith("live-ws-")  # WebSocket transcripts belong to another module
]
STREAM_CASES = [case for case in CORPUS_CASES if "stream" in case.name]

# Endpoint and path model of every corpus case, read by hand from the URL in its meta file.
CASE_ROUTES: dict[str, tuple[str, str | None]] = {
    "gemini/batchembedcontents": ("batchEmbedContents", "gemini-embedding-2-preview"),
    "gemini/cachedcontents-create": ("cachedContents.create", None),
    "gemini/counttokens": ("countTokens", "gemini-embedding-2-preview"),
    "gemini/generate-nonstream-cached": ("generateContent", "gemini-2.5-flash"),
    "gemini/generate-nonstream-thinking": ("generateContent", "gemini-2.5-flash"),
    "gemini/generate-nonstream-websearch-tooluse": ("generateContent", "gemini-2.5-pro"),
    "gemini/jsonarray-stream-gzip-thinking": ("streamGenerateContent", "gemini-flash-latest"),
    "gemini/sse-stream-basic-prompt-changes": ("streamGenerateContent", "gemini-2.0-flash-exp"),
    "gemini/sse-stream-thinking": ("streamGenerateContent", "gemini-2.5-pro"),
    "vertex/counttokens-global": ("countTokens", "gemini-2.5-flash"),
    "vertex/generate-nonstream-global": ("generateContent", "gemini-2.0-flash"),
    "vertex/predict-embeddings": ("predict", "gemini-embedding-001"),
}

# Estimates of the cases whose responses carry no usage, computed by hand from the request:
# batchembedcontents embeds "hello" and "world", 10 characters, so ceil(10 / 4) = 3 tokens.
ESTIMATED_UNITS: dict[str, dict[str, int]] = {
    "gemini/batchembedcontents": {"input_tokens": 3},
}


def provider_for(host: str) -> Provider:
    matching = [
        provider
        for provider in PROVIDERS
        if any(re.fullmatch(pattern, host) for pattern in provider.host_patterns)
    ]
    assert len(matching) == 1, host
    return matching[0]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def case_route(case: Case) -> tuple[Provider, Route]:
    url = urlsplit(case.meta["url"])
    assert url.hostname is not None
    provider = provider_for(url.hostname)
    path = url.path + (f"?{url.query}" if url.query else "")
    route = provider.match(url.hostname, case.meta["method"], path)
    assert route is not None, case.id
    return provider, route


def case_headers(case: Case) -> dict[str, str]:
    return {"content-type": case.meta["response_headers"]["content-type"][0]}


def parse_case(case: Case, chunks: list[bytes] | None = None) -> MeterResult:
    provider, route = case_route(case)
    request = provider.read_request(route, case.read(".request.json"), {})
    parser = provider.response_parser(route, request, case_headers(case))
    for chunk in chunks if chunks is not None else [case.response_body()]:
        parser.feed(chunk)
    return parser.finish()


def parse(
    route: Route,
    body: bytes,
    content_type: str = "application/json",
    request: RequestInfo | None = None,
) -> MeterResult:
    request = request or RequestInfo(
        model=route.path_model, estimate=Units(input_tokens=7, output_tokens=100)
    )
    parser = GEMINI.response_parser(route, request, {"content-type": content_type})
    parser.feed(body)
    return parser.finish()


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(event).encode() + b"\r\n\r\n" for event in events)


# Routes


STUDIO = "generativelanguage.googleapis.com"
GLOBAL = "aiplatform.googleapis.com"
REGIONAL = "us-central1-aiplatform.googleapis.com"
VERTEX_PREFIX = "/v1/projects/my-project/locations/us-central1/publishers/google/models"


@pytest.mark.parametrize(
    ("host", "method", "path", "expected"),
    [
        (
            STUDIO,
            "POST",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            Route("gemini", "generateContent", path_model="gemini-2.5-flash"),
        ),
        (
            STUDIO,
            "POST",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=abc",
            Route("gemini", "streamGenerateContent", path_model="gemini-2.5-flash"),
        ),
        (
            STUDIO,
            "POST",
            "/v1/models/gemini-1.5-pro-002:generateContent",
            Route("gemini", "generateContent", path_model="gemini-1.5-pro-002"),
        ),
        (
            STUDIO,
            "POST",
            "/v1alpha/models/gemini-2.0-flash-thinking-exp:streamGenerateContent",
            Route("gemini", "streamGenerateContent", path_model="gemini-2.0-flash-thinking-exp"),
        ),
        (
            STUDIO,
            "POST",
            "/v1beta/models/text-embedding-004:embedContent?key=abc",
            Route("gemini", "embedContent", path_model="text-embedding-004"),
        ),
        (
            STUDIO,
            "POST",
            "/v1beta/models/gemini-embedding-001:batchEmbedContents",
            Route("gemini", "batchEmbedContents", path_model="gemini-embedding-001"),
        ),
        (
            STUDIO,
            "POST",
            "/v1beta/tunedModels/my-tuned-model:generateContent",
            Route("gemini", "generateContent", path_model="my-tuned-model"),
        ),
        (
            STUDIO,
            "POST",
            "/v1beta/models/gemini-2.5-flash%3AgenerateContent",
            Route("gemini", "generateContent", path_model="gemini-2.5-flash"),
        ),
        (STUDIO, "POST", "/v1beta/cachedContents", Route("gemini", "cachedContents.create")),
        (STUDIO, "POST", "/v1/cachedContents?key=abc", Route("gemini", "cachedContents.create")),
        # Free calls pass through without spend.
        (
            STUDIO,
            "POST",
            "/v1beta/models/gemini-2.5-flash:countTokens",
            Route("gemini", "countTokens", free=True, path_model="gemini-2.5-flash"),
        ),
        (STUDIO, "GET", "/v1beta/models", Route("gemini", "models", free=True)),
        (STUDIO, "GET", "/v1beta/models/gemini-2.5-flash", Route("gemini", "models", free=True)),
        (
            STUDIO,
            "GET",
            "/v1beta/cachedContents/abc?key=abc",
            Route("gemini", "cachedContents", free=True),
        ),
        (STUDIO, "GET", "/", Route("gemini", "get", free=True)),
        # Vertex AI, on the global host, a regional host, and in express mode.
        (
            GLOBAL,
            "POST",
            f"{VERTEX_PREFIX}/gemini-2.5-flash:generateContent",
            Route("vertex-ai", "generateContent", path_model="gemini-2.5-flash"),
        ),
        (
            REGIONAL,
            "POST",
            "/v1beta1/projects/p-1/locations/us-central1/publishers/google/models/"
            "gemini-2.5-pro:streamGenerateContent?alt=sse",
            Route("vertex-ai", "streamGenerateContent", path_model="gemini-2.5-pro"),
        ),
        (
            REGIONAL,
            "POST",
            f"{VERTEX_PREFIX}/text-embedding-005:predict",
            Route("vertex-ai", "predict", path_model="text-embedding-005"),
        ),
        (
            GLOBAL,
            "POST",
            "/v1/publishers/google/models/gemini-2.5-flash:generateContent?key=abc",
            Route("vertex-ai", "generateContent", path_model="gemini-2.5-flash"),
        ),
        (
            REGIONAL,
            "POST",
            "/v1/projects/p/locations/us-central1/cachedContents",
            Route("vertex-ai", "cachedContents.create"),
        ),
        (
            REGIONAL,
            "POST",
            f"{VERTEX_PREFIX}/gemini-2.5-flash:countTokens",
            Route("vertex-ai", "countTokens", free=True, path_model="gemini-2.5-flash"),
        ),
        (
            REGIONAL,
            "POST",
            f"{VERTEX_PREFIX}/gemini-2.5-flash:computeTokens",
            Route("vertex-ai", "computeTokens", free=True, path_model="gemini-2.5-flash"),
        ),
        (
            REGIONAL,
            "GET",
            f"{VERTEX_PREFIX}/gemini-2.5-flash",
            Route("vertex-ai", "models", free=True),
        ),
        (
            REGIONAL,
            "GET",
            "/v1/projects/p/locations/us-central1/cachedContents",
            Route("vertex-ai", "cachedContents", free=True),
        ),
        # Unknown paths and methods are not metered.
        (STUDIO, "POST", "/v1beta/models/gemini-2.5-flash", None),
        (STUDIO, "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", None),
        (STUDIO, "POST", "/v1beta/models/gemini-2.5-flash:somethingNew", None),
        (STUDIO, "POST", "/models/gemini-2.5-flash:generateContent", None),
        (STUDIO, "POST", "/v1beta/files", None),
        (STUDIO, "POST", "/upload/v1beta/files?uploadType=resumable", None),
        (STUDIO, "DELETE", "/v1beta/cachedContents/abc", None),
        (STUDIO, "POST", f"{VERTEX_PREFIX}/gemini-2.5-flash:generateContent", None),
        (GLOBAL, "POST", "/v1beta/models/gemini-2.5-flash:generateContent", None),
        (
            REGIONAL,
            "POST",
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
            "claude-sonnet-4:rawPredict",
            None,
        ),
        (REGIONAL, "POST", "/v1/projects/p/locations/us-central1/endpoints/123:predict", None),
    ],
)
def test_match(host: str, method: str, path: str, expected: Route | None) -> None:
    assert provider_for(host).match(host, method, path) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("generativelanguage.googleapis.com", "gemini"),
        ("aiplatform.googleapis.com", "vertex-ai"),
        ("us-central1-aiplatform.googleapis.com", "vertex-ai"),
        ("europe-west4-aiplatform.googleapis.com", "vertex-ai"),
        ("generativelanguage.googleapis.com.example.com", None),
        ("evil-generativelanguage.googleapis.com", None),
        ("aiplatform.googleapis.com.example.com", None),
        ("storage.googleapis.com", None),
    ],
)
def test_host_patterns(host: str, expected: str | None) -> None:
    names = [
        provider.name
        for provider in PROVIDERS
        if any(re.fullmatch(pattern, host) for pattern in provider.host_patterns)
    ]
    assert names == ([expected] if expected else [])


def test_client_filter_is_none() -> None:
    route = Route("gemini", "streamGenerateContent", path_model="gemini-2.5-flash")
    assert GEMINI.client_filter(route) is None
    assert VERTEX.client_filter(route) is None


# Corpus


def test_route_table_covers_corpus() -> None:
    assert sorted(CASE_ROUTES) == sorted(case.id for case in CORPUS_CASES)


@pytest.mark.parametrize("case", CORPUS_CASES, ids=lambda case: case.id)
def test_corpus_route(case: Case) -> None:
    provider, route = case_route(case)

    endpoint, path_model = CASE_ROUTES[case.id]
    assert route.provider == provider.name
    assert route.provider == {"gemini": "gemini", "vertex": "vertex-ai"}[case.provider_dir]
    assert route.endpoint == endpoint
    assert route.path_model == path_model
    assert route.free is (case.expected["billable"] is False)


@pytest.mark.parametrize("case", CORPUS_CASES, ids=lambda case: case.id)
def test_corpus_units_exact(case: Case) -> None:
    result = parse_case(case)

    expected_units = case.expected["units"]
    if expected_units is None:
        expected_units = ESTIMATED_UNITS[case.id]
        assert result.estimate_reason
    assert result.units.to_dict() == expected_units
    assert result.usage_reported is case.expected["usage_reported"]
    if "model" in case.expected:
        assert result.model == case.expected["model"]


def test_gzip_wire_body_same_usage() -> None:
    case = Case("gemini", "jsonarray-stream-gzip-thinking")
    wire = case.wire_gzip()
    assert wire is not None
    decoder = make_decoder("gzip")
    decoded = [decoder.feed(wire[start : start + 97]) for start in range(0, len(wire), 97)]
    decoded.append(decoder.flush())

    assert parse_case(case, decoded) == parse_case(case)


def test_cache_creation_response_model() -> None:
    result = parse_case(Case("gemini", "cachedcontents-create"))

    # The response names "models/gemini-2.5-flash", and the ledger gets the bare name.
    assert result.model == "gemini-2.5-flash"


# Streams


def test_cut_stream_keeps_running_usage() -> None:
    case = Case("gemini", "sse-stream-thinking")
    body = case.read(".response.sse")
    fifth_event = [match.start() for match in re.finditer(rb"^data: ", body, re.MULTILINE)][4]

    result = parse_case(case, [body[:fifth_event]])

    # The fourth event of the recording: promptTokenCount 34, thoughtsTokenCount 787, and
    # no candidatesTokenCount yet, so output is the 787 thinking tokens.
    assert result.units == Units(input_tokens=34, output_tokens=787, reasoning_tokens=787)
    assert result.usage_reported is False
    assert result.estimate_reason == "stream cut short: last running usage"
    assert result.model == "gemini-2.5-pro"


def test_stream_without_usage_estimated() -> None:
    route = Route("gemini", "streamGenerateContent", path_model="gemini-2.5-flash")
    body = sse(
        {"candidates": [{"content": {"parts": [{"text": "abcd"}]}}], "modelVersion": "gemini-x"},
        {"candidates": [{"content": {"parts": [{"text": "efghi"}]}, "finishReason": "STOP"}]},
    )

    result = parse(route, body, "text/event-stream")

    # Input is the request estimate, 7. Output is "abcd" + "efghi", 9 characters: 3 tokens.
    assert result.units == Units(input_tokens=7, output_tokens=3)
    assert result.usage_reported is False
    assert result.estimate_reason == "stream ended without usage"
    assert result.model == "gemini-x"


def test_stream_cut_before_any_usage() -> None:
    route = Route("gemini", "streamGenerateContent", path_model="gemini-2.5-flash")
    body = sse({"candidates": [{"content": {"parts": [{"text": "12345"}]}}]})

    result = parse(route, body, "text/event-stream")

    # 5 characters seen: 2 tokens. The model falls back to the one in the path.
    assert result.units == Units(input_tokens=7, output_tokens=2)
    assert result.estimate_reason == "stream cut short"
    assert result.model == "gemini-2.5-flash"


def test_json_array_stream_crlf() -> None:
    route = Route("gemini", "streamGenerateContent", path_model="gemini-flash-latest")
    first = {
        "candidates": [{"content": {"parts": [{"text": 'a ] } [ { " \\ b'}]}}],
        "usageMetadata": {"promptTokenCount": 6, "totalTokenCount": 6},
    }
    last = {
        "candidates": [{"content": {"parts": [{"text": "c"}]}, "finishReason": "STOP"}],
        "usageMetadata": {
            "promptTokenCount": 5,
            "candidatesTokenCount": 7,
            "thoughtsTokenCount": 2,
            "totalTokenCount": 14,
        },
        "modelVersion": "gemini-2.5-flash",
    }
    body = b"[" + json.dumps(first).encode() + b",\r\n" + json.dumps(last).encode() + b"]"

    result = parse(route, body)

    # The last element counts: input 5, output 7 + 2 thinking = 9.
    assert result == MeterResult(
        "gemini-2.5-flash", Units(input_tokens=5, output_tokens=9, reasoning_tokens=2), True
    )


def test_usage_without_counts_ignored() -> None:
    route = Route("vertex-ai", "generateContent", path_model="gemini-2.0-flash")
    body = json.dumps(
        {
            "candidates": [{"content": {"parts": [{"text": "12345678"}]}}],
            "usageMetadata": {"trafficType": "ON_DEMAND"},
        }
    ).encode()

    result = parse(route, body)

    # 8 characters of generated text: 2 tokens.
    assert result.units == Units(input_tokens=7, output_tokens=2)
    assert result.usage_reported is False


# Bodies


def test_body_without_usage_estimated() -> None:
    route = Route("gemini", "generateContent", path_model="gemini-2.5-flash")
    body = json.dumps(
        {
            "candidates": [
                {
                    "content": {
                        "parts": [{"text": "12345678"}, {"text": "9", "thought": True}],
                        "role": "model",
                    }
                }
            ]
        }
    ).encode()

    result = parse(route, body)

    # "12345678" + "9" = 9 characters: 3 tokens.
    assert result.units == Units(input_tokens=7, output_tokens=3)
    assert result.usage_reported is False
    assert result.estimate_reason == "response carries no usage"
    assert result.model == "gemini-2.5-flash"


def test_audio_tokens_inside_totals() -> None:
    route = Route("gemini", "generateContent", path_model="gemini-2.5-flash")
    usage = {
        "promptTokenCount": 120,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 20},
            {"modality": "AUDIO", "tokenCount": 100},
        ],
        "candidatesTokenCount": 30,
        "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 30}],
        "totalTokenCount": 150,
    }

    result = parse(route, json.dumps({"usageMetadata": usage}).encode())

    assert result.units == Units(
        input_tokens=120, audio_input_tokens=100, output_tokens=30, audio_output_tokens=30
    )
    assert result.usage_reported is True


def test_large_body_usage_from_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonbody, "MAX_WHOLE_BYTES", 1024)
    route = Route("gemini", "generateContent", path_model="gemini-2.5-flash-image")
    payload = {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {"text": 'a "usageMetadata": {"promptTokenCount": 999} b'},
                        {"inlineData": {"mimeType": "image/png", "data": "A" * 5000}},
                    ]
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 10,
            "candidatesTokenCount": 1290,
            "totalTokenCount": 1300,
        },
        "modelVersion": "gemini-2.5-flash-image-001",
    }
    body = json.dumps(payload).encode()
    request = RequestInfo(model="gemini-2.5-flash-image")
    parser = GEMINI.response_parser(route, request, {"content-type": "application/json"})
    for chunk in split_at(body, list(range(0, len(body), 700))):
        parser.feed(chunk)

    result = parser.finish()

    assert result == MeterResult(
        "gemini-2.5-flash-image-001", Units(input_tokens=10, output_tokens=1290), True
    )


def test_embedding_usage_when_present() -> None:
    route = Route("vertex-ai", "embedContent", path_model="gemini-embedding-001")
    body = b'{"embedding":{"values":[0.1]},"usageMetadata":{"promptTokenCount":6}}'

    result = parse(route, body)

    assert result == MeterResult("gemini-embedding-001", Units(input_tokens=6), True)


def test_embedding_non_json_estimated() -> None:
    route = Route("gemini", "embedContent", path_model="gemini-embedding-001")

    result = parse(route, b"<html>oops</html>")

    assert result.units == Units(input_tokens=7)
    assert result.usage_reported is False


def test_predict_counts_images() -> None:
    route = Route("vertex-ai", "predict", path_model="imagen-4.0-generate-001")
    body = json.dumps(
        {
            "predictions": [
                {"bytesBase64Encoded": "iVBORw0K", "mimeType": "image/png"},
                {"bytesBase64Encoded": "iVBORw0K", "mimeType": "image/png"},
                {"raiFilteredReason": "filtered"},
            ]
        }
    ).encode()

    result = parse(route, body)

    # Two images came back; the filtered one is not billed.
    assert result == MeterResult("imagen-4.0-generate-001", Units(images=2), True)


def test_predict_without_usage_estimated() -> None:
    route = Route("vertex-ai", "predict", path_model="text-embedding-005")
    request = RequestInfo(model="text-embedding-005", estimate=Units(input_tokens=4, chars=12))

    result = parse(route, b'{"predictions": [{"embeddings": {"values": [0.5]}}]}', request=request)

    assert result.units == Units(input_tokens=4, chars=12)
    assert result.usage_reported is False


def test_cache_creation_without_usage() -> None:
    route = Route("gemini", "cachedContents.create")
    request = RequestInfo(model="gemini-2.5-flash", estimate=Units(input_tokens=900))

    result = parse(route, b'{"name": "cachedContents/abc"}', request=request)

    assert result == MeterResult(
        "gemini-2.5-flash", Units(input_tokens=900), False, "response carries no usage"
    )


def test_free_route_records_nothing() -> None:
    route = Route("gemini", "countTokens", free=True, path_model="gemini-2.5-flash")

    result = parse(route, b'{"totalTokens": 5}')

    assert result == MeterResult("gemini-2.5-flash", Units(), True)


# Requests


def test_request_estimate_generate() -> None:
    route = Route("gemini", "generateContent", path_model="gemini-2.5-flash")
    body = json.dumps(
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "abcdefgh"},
                        {"inlineData": {"mimeType": "image/png", "data": "QUJDRA=="}},
                    ],
                }
            ],
            "systemInstruction": {"parts": [{"text": "ijkl"}]},
            "generationConfig": {"maxOutputTokens": 50},
        }
    ).encode()

    info = GEMINI.read_request(route, body, {})

    # "abcdefgh" + "ijkl" = 12 characters: 3 tokens. The image is not text.
    assert info.estimate == Units(input_tokens=3, output_tokens=50)
    assert info.model == "gemini-2.5-flash"
    assert info.streaming is False
    assert info.upstream_body is None


def test_request_snake_case_fields() -> None:
    route = Route("vertex-ai", "streamGenerateContent", path_model="gemini-2.5-pro")
    body = json.dumps(
        {
            "contents": [{"parts": [{"text": "abcdefghi"}]}],
            "system_instruction": {"parts": [{"text": "j"}]},
            "generation_config": {"max_output_tokens": 77},
        }
    ).encode()

    info = VERTEX.read_request(route, body, {})

    # 9 + 1 = 10 characters: 3 tokens.
    assert info.estimate == Units(input_tokens=3, output_tokens=77)
    assert info.streaming is True


def test_request_default_output_cap() -> None:
    route = Route("gemini", "generateContent", path_model="gemini-2.5-flash")

    info = GEMINI.read_request(route, b'{"contents": [{"parts": [{"text": "abcd"}]}]}', {})

    assert info.estimate == Units(input_tokens=1, output_tokens=1024)


def test_request_estimate_vertex_predict() -> None:
    provider, route = case_route(Case("vertex", "predict-embeddings"))

    info = provider.read_request(
        route, Case("vertex", "predict-embeddings").read(".request.json"), {}
    )

    # "Hello, world!" is 13 characters (4 tokens) and 12 without its space. The recorded
    # response reports billableCharacterCount 12.
    assert info.estimate == Units(input_tokens=4, chars=12)
    assert info.model == "gemini-embedding-001"


def test_request_vertex_cache_model() -> None:
    route = Route("vertex-ai", "cachedContents.create")
    resource = "projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash-001"
    body = json.dumps(
        {
            "model": resource,
            "contents": [{"role": "user", "parts": [{"text": "12345678"}]}],
        }
    ).encode()

    info = VERTEX.read_request(route, body, {})

    assert info.model == "gemini-2.0-flash-001"
    assert info.estimate == Units(input_tokens=2)


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'{"contents": "x"}', b"\xff\xfe"])
def test_request_any_body_keeps_model(body: bytes) -> None:
    route = Route("gemini", "streamGenerateContent", path_model="gemini-2.5-flash")

    info = GEMINI.read_request(route, body, {})

    assert info.model == "gemini-2.5-flash"
    assert info.streaming is True


# Properties


@settings(max_examples=500, deadline=None)
@given(
    case=st.sampled_from(CORPUS_CASES),
    cuts=st.lists(st.integers(0, 10**6), max_size=40),
)
def test_any_split_gives_same_result(case: Case, cuts: list[int]) -> None:
    body = case.response_body()

    assert parse_case(case, split_at(body, cuts)) == parse_case(case)


# Routes and content types of every parser the module has.
PARSER_SHAPES = [
    (Route("gemini", "generateContent", path_model="m"), "application/json"),
    (Route("gemini", "streamGenerateContent", path_model="m"), "text/event-stream"),
    (Route("gemini", "streamGenerateContent", path_model="m"), "application/json"),
    (Route("gemini", "embedContent", path_model="m"), "application/json"),
    (Route("gemini", "batchEmbedContents", path_model="m"), "application/json"),
    (Route("vertex-ai", "predict", path_model="m"), "application/json"),
    (Route("gemini", "cachedContents.create"), "application/json"),
]
FRAGMENTS = [
    b"data: ",
    b"data:",
    b"\r\n",
    b"\n\n",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b":",
    b'"',
    b"\\",
    b"1",
    b"-1",
    b"1.5",
    b"1e999",
    b"NaN",
    b"null",
    b"true",
    b'"x"',
    b'"usageMetadata"',
    b'"promptTokenCount"',
    b'"candidatesTokenCount"',
    b'"thoughtsTokenCount"',
    b'"promptTokensDetails"',
    b'"modality"',
    b'"AUDIO"',
    b'"candidates"',
    b'"content"',
    b'"parts"',
    b'"text"',
    b'"finishReason"',
    b'"modelVersion"',
    b'"model"',
    b'"predictions"',
    b'"embeddings"',
    b'"statistics"',
    b'"token_count"',
    b'"metadata"',
    b'"billableCharacterCount"',
    b'"bytesBase64Encoded"',
    b'"totalTokenCount"',
]
USAGE_KEYS = [fragment.strip(b'"').decode() for fragment in FRAGMENTS if fragment[:1] == b'"']
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(USAGE_KEYS), children, max_size=5)
    ),
    max_leaves=30,
)
GARBAGE = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.sampled_from(FRAGMENTS), max_size=200).map(b"".join),
    st.lists(JSON_VALUES, max_size=4).map(
        lambda values: b"".join(
            b"data: " + json.dumps(value).encode() + b"\n\n" for value in values
        )
    ),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.lists(JSON_VALUES, max_size=4).map(lambda values: json.dumps(values).encode()),
)


@settings(max_examples=500, deadline=None)
@given(
    data=GARBAGE,
    shape=st.sampled_from(PARSER_SHAPES),
    cuts=st.lists(st.integers(0, 10**4), max_size=10),
)
def test_garbage_never_raises(data: bytes, shape: tuple[Route, str], cuts: list[int]) -> None:
    route, content_type = shape
    request = GEMINI.read_request(route, data, {})
    parser = GEMINI.response_parser(route, request, {"content-type": content_type})
    for chunk in split_at(data, cuts):
        parser.feed(chunk)

    result = parser.finish()

    assert isinstance(result, MeterResult)
    assert all(value >= 0 for value in result.units.to_dict().values())


@settings(max_examples=500, deadline=None)
@given(
    case=st.sampled_from(CORPUS_CASES),
    end=st.integers(0, 10**6),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_truncated_bodies_never_raise(case: Case, end: int, cuts: list[int]) -> None:
    body = case.response_body()
    prefix = body[: end % (len(body) + 1)]

    result = parse_case(case, split_at(prefix, cuts))

    assert result.model is not None
    if prefix == body:
        assert result == parse_case(case)

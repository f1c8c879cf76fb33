"""Request ceilings: the most a request can be billed, read from the request alone."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from costtap.providers import provider_for_host
from costtap.providers.base import RequestInfo, Units
from tests.support.corpus import Case, all_cases

JSON = {"content-type": "application/json"}


def read(host: str, path: str, payload: dict[str, Any]) -> tuple[bytes, RequestInfo]:
    provider = provider_for_host(host)
    assert provider is not None
    route = provider.match(host, "POST", path)
    assert route is not None
    body = json.dumps(payload).encode()
    return body, provider.read_request(route, body, JSON)


def openai_chat(**fields: Any) -> tuple[bytes, RequestInfo]:
    payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hi"}], **fields}
    return read("api.openai.com", "/v1/chat/completions", payload)


def test_ceiling_of_capped_text_chat() -> None:
    body, info = openai_chat(max_completion_tokens=50, n=3)
    # Input: one token per body byte at most, plus 64 tokens of framing. Output: 50 per choice.
    assert info.ceiling == Units(input_tokens=len(body) + 64, output_tokens=150)


def test_ceiling_adds_tool_prompt_allowance() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body, info = openai_chat(max_tokens=10, tools=[tool])
    assert info.ceiling == Units(input_tokens=len(body) + 64 + 1024, output_tokens=10)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="no output cap"),
        pytest.param(
            {
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.test/a"}}
                        ],
                    }
                ],
            },
            id="image input",
        ),
        pytest.param({"max_tokens": 10, "web_search_options": {}}, id="web search"),
        pytest.param(
            {"max_tokens": 10, "data_sources": [{"type": "azure_search", "parameters": {}}]},
            id="Azure data sources",
        ),
        pytest.param(
            {"max_tokens": 10, "modalities": ["text", "audio"], "audio": {"voice": "alloy"}},
            id="audio output",
        ),
    ],
)
def test_ceiling_missing_for_unbounded_chats(fields: dict[str, Any]) -> None:
    assert openai_chat(**fields)[1].ceiling is None


def test_ceiling_missing_for_built_in_tools() -> None:
    payload: dict[str, Any] = {"model": "gpt-4o", "input": "Find news", "max_output_tokens": 40}
    body, plain = read("api.openai.com", "/v1/responses", payload)
    assert plain.ceiling == Units(input_tokens=len(body) + 64, output_tokens=40)
    searched = read(
        "api.openai.com", "/v1/responses", {**payload, "tools": [{"type": "web_search"}]}
    )[1]
    assert searched.ceiling is None
    stored = read("api.openai.com", "/v1/responses", {**payload, "previous_response_id": "r"})[1]
    assert stored.ceiling is None


def test_ceiling_of_embeddings_without_cap() -> None:
    body, info = read(
        "api.openai.com", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "abc"}
    )
    assert info.ceiling == Units(input_tokens=len(body) + 64)


def test_ceiling_of_anthropic_cache_points() -> None:
    payload = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Rules", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hi"}],
    }
    body, info = read("api.anthropic.com", "/v1/messages", payload)
    bound = len(body) + 64
    assert info.ceiling == Units(input_tokens=bound, cache_write_tokens=bound, output_tokens=100)
    server_tool = {**payload, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    assert read("api.anthropic.com", "/v1/messages", server_tool)[1].ceiling is None


GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"


def gemini(payload: dict[str, Any]) -> tuple[bytes, RequestInfo]:
    return read("generativelanguage.googleapis.com", GEMINI_PATH, payload)


def test_ceiling_of_gemini_counts_candidates() -> None:
    payload = {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "generationConfig": {"maxOutputTokens": 100, "candidateCount": 2},
    }
    body, info = gemini(payload)
    assert info.ceiling == Units(input_tokens=len(body) + 64, output_tokens=200)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(
            {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}]},
            id="inline image",
        ),
        pytest.param({"tools": [{"googleSearch": {}}]}, id="search grounding"),
        pytest.param({"cachedContent": "cachedContents/abc"}, id="cached content"),
        pytest.param(
            {"generationConfig": {"maxOutputTokens": 10, "responseModalities": ["TEXT", "IMAGE"]}},
            id="image output",
        ),
    ],
)
def test_ceiling_missing_for_unbounded_gemini(extra: dict[str, Any]) -> None:
    payload = {
        "contents": [{"parts": [{"text": "Hi"}]}],
        "generationConfig": {"maxOutputTokens": 10},
        **extra,
    }
    assert gemini(payload)[1].ceiling is None


def test_ceiling_of_speech_is_its_characters() -> None:
    text = "Hello there"
    _, eleven = read(
        "api.elevenlabs.io", "/v1/text-to-speech/voice-id", {"text": text, "model_id": "m"}
    )
    _, google = read(
        "texttospeech.googleapis.com",
        "/v1/text:synthesize",
        {"input": {"text": text}, "voice": {"name": "en-US-Standard-A"}},
    )
    _, openai_speech = read(
        "api.openai.com", "/v1/audio/speech", {"model": "tts-1", "input": text, "voice": "alloy"}
    )
    for info in (eleven, google, openai_speech):
        assert info.ceiling == Units(chars=11)
    # A speech stream is billed in tokens, which the request does not bound.
    streamed = read(
        "api.openai.com",
        "/v1/audio/speech",
        {"model": "gpt-4o-mini-tts", "input": text, "voice": "alloy", "stream_format": "sse"},
    )[1]
    assert streamed.ceiling is None


def bounded_corpus_cases() -> list[tuple[Case, RequestInfo]]:
    """Return each recorded JSON request that has a ceiling, read from its compact JSON."""
    found: list[tuple[Case, RequestInfo]] = []
    for case in all_cases():
        if not case.has(".request.json") or not case.expected.get("units"):
            continue
        url = urlsplit(case.meta["url"])
        host = url.hostname or ""
        path = url.path + (f"?{url.query}" if url.query else "")
        provider = provider_for_host(host)
        route = provider.match(host, case.meta.get("method", "POST"), path) if provider else None
        if provider is None or route is None or route.free:
            continue
        # Compact JSON is the smallest body a client could have sent for the same request.
        body = json.dumps(case.request_body, separators=(",", ":"), ensure_ascii=False).encode()
        info = provider.read_request(route, body, JSON)
        if info.ceiling is not None:
            found.append((case, info))
    return found


BOUNDED_CASES = bounded_corpus_cases()
PRICED_ABOVE_TOTALS = (
    "input_tokens",
    "cache_write_tokens",
    "audio_input_tokens",
    "output_tokens",
    "audio_output_tokens",
    "chars",
    "seconds",
    "images",
)


def test_ceiling_found_for_capped_recorded_requests() -> None:
    # The recorded text requests with an output cap, and the character-billed speech. The
    # other recorded chats set no cap, or carry media or audio.
    assert sorted(case.id for case, _ in BOUNDED_CASES) == [
        "anthropic/messages-stream-gzip-thinking",
        "anthropic/messages-stream-sonnet45",
        "anthropic/messages-stream-thinking",
        "elevenlabs/tts-convert-sdk",
        "gcp-tts/synthesize-text",
        "openai-spec/audio-speech",
        "openai/chat-nonstream-o3mini-reasoning",
        "openai/embeddings-base64",
    ]


@pytest.mark.parametrize(
    ("case", "info"), BOUNDED_CASES, ids=[case.id for case, _ in BOUNDED_CASES]
)
def test_ceiling_is_above_recorded_usage(case: Case, info: RequestInfo) -> None:
    assert info.ceiling is not None
    billed = Units.from_dict(case.expected["units"])
    # Totals and the parts billed above the text rates. Cached input, reasoning and other
    # parts inside the totals cost no more than their totals' rates.
    for name in PRICED_ABOVE_TOTALS:
        assert getattr(billed, name) <= getattr(info.ceiling, name), name

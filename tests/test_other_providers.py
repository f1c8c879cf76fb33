"""Anthropic, ElevenLabs and Google Cloud TTS modules on cases the corpus does not record."""

from __future__ import annotations

import json

import pytest

from costtap.providers.anthropic import AnthropicProvider
from costtap.providers.base import Route, Units
from costtap.providers.elevenlabs import ElevenLabsProvider
from costtap.providers.google_tts import GoogleTTSProvider

JSON = {"content-type": "application/json"}


def test_anthropic_body_counts_cache_traffic_as_input() -> None:
    provider = AnthropicProvider()
    route = provider.match("api.anthropic.com", "POST", "/v1/messages")
    assert route == Route("anthropic", "messages")
    request = provider.read_request(
        route, b'{"model": "claude-sonnet-4-5", "max_tokens": 100}', JSON
    )
    body = {
        "model": "claude-sonnet-4-5-20250929",
        "usage": {
            "input_tokens": 10,
            "cache_read_input_tokens": 2000,
            "cache_creation_input_tokens": 300,
            "output_tokens": 50,
        },
    }
    parser = provider.response_parser(route, request, JSON)
    parser.feed(json.dumps(body).encode())

    result = parser.finish()

    # Anthropic counts cache reads and writes outside input_tokens: 10 + 2000 + 300 = 2310.
    assert result.units == Units(
        input_tokens=2310, cached_input_tokens=2000, cache_write_tokens=300, output_tokens=50
    )
    assert result.model == "claude-sonnet-4-5-20250929"
    assert result.usage_reported is True


def test_anthropic_stream_cut_before_delta() -> None:
    provider = AnthropicProvider()
    route = Route("anthropic", "messages")
    request = provider.read_request(route, b'{"model": "claude-haiku-4-5", "max_tokens": 64}', JSON)
    parser = provider.response_parser(route, request, {"content-type": "text/event-stream"})
    start = {
        "type": "message_start",
        "message": {"model": "claude-haiku-4-5", "usage": {"input_tokens": 40, "output_tokens": 1}},
    }
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "12345678"}}
    parser.feed(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
    parser.feed(f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode())

    result = parser.finish()

    # Input is known from message_start; 8 characters of output text are 2 tokens.
    assert result.units == Units(input_tokens=40, output_tokens=2)
    assert result.usage_reported is False


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/messages/count_tokens", Route("anthropic", "messages", free=True)),
        ("GET", "/v1/models", Route("anthropic", "models", free=True)),
        ("POST", "/v1/complete", None),
    ],
)
def test_anthropic_routes(method: str, path: str, expected: Route | None) -> None:
    assert AnthropicProvider().match("api.anthropic.com", method, path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v1/text-to-speech/voice",
        "/v1/text-to-speech/voice/stream",
        "/v1/text-to-speech/voice/with-timestamps",
        "/v1/text-to-speech/voice/stream/with-timestamps?output_format=mp3_44100_128",
    ],
)
def test_elevenlabs_tts_paths_default_model(path: str) -> None:
    provider = ElevenLabsProvider()
    route = provider.match("api.elevenlabs.io", "POST", path)
    assert route == Route("elevenlabs", "text-to-speech")

    request = provider.read_request(route, json.dumps({"text": "Hej då"}).encode(), JSON)
    result = provider.response_parser(route, request, {"content-type": "audio/mpeg"}).finish()

    assert result.units == Units(chars=6)
    assert result.model == "eleven_multilingual_v2"


def test_elevenlabs_stt_falls_back_to_last_word() -> None:
    provider = ElevenLabsProvider()
    route = Route("elevenlabs", "speech-to-text")
    request = provider.read_request(route, b"", {"content-type": "multipart/form-data; boundary=x"})
    parser = provider.response_parser(route, request, {**JSON, "character-cost": "7"})
    words = [{"text": "hi", "start": 0.1, "end": 0.4}, {"text": "there", "start": 0.5, "end": 1.25}]
    parser.feed(json.dumps({"words": words}).encode())

    result = parser.finish()

    assert result.units == Units(seconds=1.25, credits=7)
    assert result.usage_reported is True


def test_elevenlabs_speech_to_speech_without_header_is_estimate() -> None:
    provider = ElevenLabsProvider()
    route = provider.match("api.elevenlabs.io", "POST", "/v1/speech-to-speech/voice/stream")
    assert route == Route("elevenlabs", "speech-to-speech")

    result = provider.response_parser(route, provider.read_request(route, b"", {}), {}).finish()

    assert result.usage_reported is False
    assert result.estimate_reason == "no character-cost header"


@pytest.mark.parametrize(
    ("source", "chars"),
    [
        ({"text": "Let's slow things down"}, 22),
        ({"ssml": "<speak>Hi</speak>"}, 17),  # SSML tags are billed
        ({"markup": "Hello"}, 5),
    ],
)
def test_google_tts_counts_input_characters(source: dict[str, str], chars: int) -> None:
    provider = GoogleTTSProvider()
    route = provider.match("texttospeech.googleapis.com", "POST", "/v1/text:synthesize")
    assert route == Route("google-tts", "text:synthesize")
    body = json.dumps({"input": source, "voice": {"name": "en-US-Neural2-C"}}).encode()

    result = provider.response_parser(
        route, provider.read_request(route, body, JSON), JSON
    ).finish()

    assert result.units == Units(chars=chars)
    assert result.model == "en-US-Neural2-C"

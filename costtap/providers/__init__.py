"""Provider modules and the lookup from a request's host to the module that meters it."""

from __future__ import annotations

import re
from functools import cache

from costtap.providers.anthropic import AnthropicProvider
from costtap.providers.base import Provider, Route, WebSocketMeter
from costtap.providers.elevenlabs import ElevenLabsProvider, StreamInputMeter, match_stream_input
from costtap.providers.gemini import GeminiProvider, VertexProvider
from costtap.providers.gemini_live import LiveMeter, match_live
from costtap.providers.google_tts import GoogleTTSProvider
from costtap.providers.openai import OpenAIProvider, RealtimeMeter, match_realtime

PROVIDERS: tuple[Provider, ...] = (
    OpenAIProvider(),
    GeminiProvider(),
    VertexProvider(),
    AnthropicProvider(),
    ElevenLabsProvider(),
    GoogleTTSProvider(),
)


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def provider_for_host(host: str) -> Provider | None:
    """Return the provider that claims `host` (case-insensitive, without port), if any."""
    host = host.lower().rstrip(".")
    for provider in PROVIDERS:
        if any(_compiled(pattern).fullmatch(host) for pattern in provider.host_patterns):
            return provider
    return None


def intercepted_host_patterns() -> list[str]:
    """Return the patterns of every host costtap decrypts; other TLS passes as a tunnel."""
    return [pattern for provider in PROVIDERS for pattern in provider.host_patterns]


def websocket_meter_for(host: str, path: str) -> tuple[Route, WebSocketMeter] | None:
    """Return the route and a fresh meter for a WebSocket upgrade request, if it is metered."""
    host = host.lower().rstrip(".")
    provider = provider_for_host(host)
    if provider is None:
        return None
    if provider.name == "openai" and (route := match_realtime(host, path)):
        return route, RealtimeMeter(route)
    if provider.name == "elevenlabs" and (route := match_stream_input(host, path)):
        return route, StreamInputMeter(route)
    if provider.name in ("gemini", "vertex-ai") and (
        route := match_live(host, path, provider.name)
    ):
        return route, LiveMeter(route)
    return None

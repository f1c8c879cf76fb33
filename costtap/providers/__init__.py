"""Provider modules and the lookup from a request's host to the module that meters it."""

from __future__ import annotations

import re
from functools import cache

from costtap.providers.anthropic import AnthropicProvider
from costtap.providers.base import Provider
from costtap.providers.elevenlabs import ElevenLabsProvider
from costtap.providers.google_tts import GoogleTTSProvider
from costtap.providers.openai import OpenAIProvider

PROVIDERS: tuple[Provider, ...] = (
    OpenAIProvider(),
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

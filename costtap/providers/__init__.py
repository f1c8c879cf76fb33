"""Provider modules and the lookup from a request's host to the module that meters it."""

from __future__ import annotations

from costtap.providers.base import Provider
from costtap.providers.openai import OpenAIProvider

PROVIDERS: tuple[Provider, ...] = (OpenAIProvider(),)


def provider_for_host(host: str) -> Provider | None:
    """Return the provider that claims `host` (case-insensitive, without port), if any."""
    host = host.lower().rstrip(".")
    for provider in PROVIDERS:
        if host in provider.hosts:
            return provider
    return None


def intercepted_hosts() -> list[str]:
    """Return every host that costtap decrypts; all other TLS passes as an opaque tunnel."""
    return [host for provider in PROVIDERS for host in provider.hosts]

"""The allow-list of decrypted hosts: only hosts that a provider module claims."""

from __future__ import annotations


def allow_hosts_patterns(host_patterns: list[str]) -> list[str]:
    """Return mitmproxy `allow_hosts` patterns for these host patterns, on any port.

    mitmproxy searches each pattern in "host:port", so the patterns are anchored at both
    ends: `api.openai.com.evil.example` must not match `api\\.openai\\.com`.
    """
    return [rf"^(?:{pattern}):\d+$" for pattern in host_patterns]

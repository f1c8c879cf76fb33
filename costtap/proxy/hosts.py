"""The allow-list of decrypted hosts: only hosts that a provider module claims."""

from __future__ import annotations

import re


def allow_hosts_patterns(hosts: list[str]) -> list[str]:
    """Return mitmproxy `allow_hosts` patterns that match exactly these hosts on any port.

    mitmproxy searches each pattern in "host:port", so the patterns are anchored at both
    ends: `api.openai.com.evil.example` must not match `api.openai.com`.
    """
    return [rf"^{re.escape(host)}:\d+$" for host in hosts]

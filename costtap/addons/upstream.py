"""Send a provider host's traffic to another base URL while the client keeps its host.

Used for private endpoints, regional gateways and local fakes in tests. The destination is
rewritten in `requestheaders`, before mitmproxy dials anything: with the lazy connection
strategy the provider's own host is then never resolved or dialed.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from costtap.config.settings import Upstream

logger = logging.getLogger(__name__)


class UpstreamOverride:
    def __init__(self, upstreams: dict[str, Upstream]) -> None:
        self._upstreams = upstreams

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        target = self._upstreams.get(flow.request.host.lower().rstrip("."))
        if target is None:
            return
        flow.request.scheme = target.scheme
        flow.request.host = target.host
        flow.request.port = target.port
        if target.path_prefix:
            flow.request.path = target.path_prefix + flow.request.path

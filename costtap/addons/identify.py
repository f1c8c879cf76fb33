"""The identify addon: attribute each call on a provider host to an app, user, project, job.

Runs in the `request` hook, when the body is buffered, for every flow on a provider host.
It also removes costtap's own `X-Costtap-*` headers and the headers the apps file marks
`strip: true`, so they never reach the provider. Identity values are logged only by field
name and source, never by value.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from costtap.addons.admin import Metrics
from costtap.addons.proxyauth import METADATA_PROXY_USER
from costtap.config.store import AppsStore
from costtap.identity import CallView, headers_to_strip, resolve_identity

logger = logging.getLogger(__name__)

METADATA_PROVIDER_HOST = "costtap.provider_host"
METADATA_APP = "costtap.app"
METADATA_IDENTITY = "costtap.identity"

# Rejected values are logged once per (app, field, source), up to this many combinations.
MAX_LOGGED_REJECTIONS = 1000


class Identify:
    def __init__(self, store: AppsStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._logged: set[tuple[str, str, str]] = set()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        if METADATA_PROVIDER_HOST not in flow.metadata:
            return
        apps = self._store.current
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        view = CallView(
            headers=flow.request.headers,
            query={name: flow.request.query[name] for name in flow.request.query},
            body=flow.request.get_content(strict=False) or b"",
            client_ip=peer.removeprefix("::ffff:") if peer else None,
            proxy_user=flow.metadata.get(METADATA_PROXY_USER),
        )
        identity = resolve_identity(apps, view)
        for name in headers_to_strip(apps.app(identity.app), flow.request.headers):
            flow.request.headers.pop(name, None)
        flow.metadata[METADATA_APP] = identity.app
        flow.metadata[METADATA_IDENTITY] = dict(identity.values)
        for field, source, reason in identity.rejected:
            self._metrics.identity_rejected.labels(app=identity.app, field=field).inc()
            key = (identity.app, field, source)
            if key not in self._logged and len(self._logged) < MAX_LOGGED_REJECTIONS:
                self._logged.add(key)
                logger.warning(
                    "app %s: %s from %s rejected (%s); the next source is used",
                    identity.app,
                    field,
                    source,
                    reason,
                )

"""Proxy credentials: `HTTPS_PROXY=http://APP:TOKEN@host:port` names and proves the app.

Tokens are compared in constant time. The user name of a valid pair is kept for the client
connection, since requests inside a CONNECT tunnel carry no credentials of their own. With
`require_proxy_auth`, a request without valid credentials gets 407 and is never forwarded.
Tokens and authorization headers are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import weakref
from collections.abc import MutableMapping

from mitmproxy import connection, http

from costtap.config.store import AppsStore

logger = logging.getLogger(__name__)

METADATA_PROXY_USER = "costtap.proxy_user"
REALM = "costtap"


def parse_basic(value: str) -> tuple[str, str] | None:
    """Return (user, password) from a Basic authorization value, or None."""
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, separator, password = decoded.partition(":")
    return (user, password) if separator else None


class ProxyCredentials:
    def __init__(self, store: AppsStore) -> None:
        self._store = store
        self._authenticated: MutableMapping[connection.Client, str] = weakref.WeakKeyDictionary()
        self._warned_users: set[str] = set()

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        self._authenticate(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        user = self._authenticated.get(flow.client_conn)
        if user is not None:
            flow.metadata[METADATA_PROXY_USER] = user
            return
        # A plain-HTTP request through the proxy carries its own credentials; a request
        # inside a tunnel whose CONNECT had none does not.
        self._authenticate(flow)

    def _authenticate(self, flow: http.HTTPFlow) -> None:
        apps = self._store.current
        value = flow.request.headers.get("proxy-authorization")
        if value is not None:
            del flow.request.headers["proxy-authorization"]
        credentials = parse_basic(value) if value is not None else None
        user = self._check(credentials)
        if user is not None:
            self._authenticated[flow.client_conn] = user
            flow.metadata[METADATA_PROXY_USER] = user
            return
        if apps.config.require_proxy_auth:
            client = flow.client_conn.peername[0] if flow.client_conn.peername else "unknown"
            problem = "invalid credentials" if value is not None else "no credentials"
            logger.warning(
                "rejected a request from %s with %s (require_proxy_auth)", client, problem
            )
            flow.response = http.Response.make(
                407,
                b"costtap: proxy authentication required: use HTTPS_PROXY=http://APP:TOKEN@host:port\n",
                {"Proxy-Authenticate": f'Basic realm="{REALM}"', "Content-Type": "text/plain"},
            )

    def _check(self, credentials: tuple[str, str] | None) -> str | None:
        if credentials is None:
            return None
        user, token = credentials
        expected = self._store.current.tokens.get(user)
        if expected is not None and hmac.compare_digest(token.encode(), expected[1].encode()):
            return user
        if user not in self._warned_users and len(self._warned_users) < 1000:
            self._warned_users.add(user)
            logger.warning(
                "invalid proxy credentials for user %r; the call is not attributed to it", user
            )
        return None

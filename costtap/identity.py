"""Caller identity: the app, and the user, project and job read from the call itself.

Pure code over a `CallView` of the request, so that every rule is tested without a proxy.
The app is recognised in a fixed order, most trusted first: valid proxy credentials, the
client's address range, a header, then the default app. A caller that authenticated as one
app cannot claim another with a header.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from costtap.config.apps import IDENTITY_FIELDS, App, LoadedApps, Source

MAX_VALUE_LENGTH = 256
# Headers with this prefix are costtap's own and never reach the provider.
INTERNAL_HEADER_PREFIX = "x-costtap-"


@dataclass(frozen=True)
class CallView:
    """The parts of a request that identity is read from."""

    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes
    client_ip: str | None
    # The proxy user name, only once its token was checked.
    proxy_user: str | None = None

    @cached_property
    def json_body(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except (ValueError, RecursionError):
            return None


@dataclass
class Identity:
    app: str
    values: dict[str, str] = field(default_factory=dict)
    # (field, source description, reason) of each value rejected as invalid.
    rejected: list[tuple[str, str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        return self.values.get(name)


def recognise_app(apps: LoadedApps, view: CallView) -> str:
    """Return the name of the app the call belongs to."""
    if view.proxy_user is not None and view.proxy_user in apps.tokens:
        return apps.tokens[view.proxy_user][0]
    if view.client_ip is not None:
        try:
            address = ipaddress.ip_address(view.client_ip)
        except ValueError:
            address = None
        if address is not None:
            for network, name in apps.networks:
                if address.version == network.version and address in network:
                    return name
    for app in apps.config.apps:
        header = app.match.header
        if header is not None and view.headers.get(header.name) == header.value:
            return app.name
    return apps.default_app


def resolve_identity(apps: LoadedApps, view: CallView) -> Identity:
    """Recognise the app, then read each identity field from its ordered sources."""
    identity = Identity(recognise_app(apps, view))
    app = apps.app(identity.app)
    if app is None:
        return identity
    for name in IDENTITY_FIELDS:
        for source in getattr(app, name):
            raw = read_source(source, view)
            if raw is None or raw == "":
                continue
            reason = invalid_reason(raw)
            if reason is not None:
                identity.rejected.append((name, describe_source(source), reason))
                continue
            identity.values[name] = raw
            break
    return identity


def read_source(source: Source, view: CallView) -> str | None:
    if source.header is not None:
        return view.headers.get(source.header)
    if source.query is not None:
        return view.query.get(source.query)
    if source.body is not None:
        return _scalar(_follow(view.json_body, source.body))
    if source.proxy_user:
        return view.proxy_user
    if source.client_address:
        return view.client_ip
    return source.value


def invalid_reason(value: str) -> str | None:
    """Return why an identity value is rejected, or None when it is valid."""
    if len(value) > MAX_VALUE_LENGTH:
        return f"longer than {MAX_VALUE_LENGTH} characters ({len(value)})"
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in value):
        return "contains control characters"
    return None


def describe_source(source: Source) -> str:
    for kind in ("header", "query", "body"):
        if (name := getattr(source, kind)) is not None:
            return f"{kind} {name}"
    if source.proxy_user:
        return "proxy user"
    if source.client_address:
        return "client address"
    return "fixed value"


def headers_to_strip(app: App | None, headers: Mapping[str, str]) -> list[str]:
    """Return the names of request headers that must not reach the provider."""
    names = [name for name in headers if name.lower().startswith(INTERNAL_HEADER_PREFIX)]
    if app is not None:
        for name in IDENTITY_FIELDS:
            for source in getattr(app, name):
                if source.strip and source.header is not None and source.header in headers:
                    names.append(source.header)
    return names


def _follow(value: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    return None

"""Recognising the app and reading identity: every source kind, precedence and rejections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy.http import Headers

from costtap.config.apps import load_apps
from costtap.identity import CallView, headers_to_strip, recognise_app, resolve_identity

APPS_FILE = {
    "default_app": "shared",
    "apps": [
        {
            "name": "video",
            "match": {"proxy_user": "video", "proxy_token": "${VIDEO_TOKEN}"},
            "user": [
                {"header": "X-User-Id", "strip": True},
                {"query": "uid"},
                {"body": "user"},
                {"body": "metadata.user_id"},
                {"body": "messages.0.name"},
                {"proxy_user": True},
            ],
            "project": [{"body": "labels.project"}, {"value": "p-default"}],
            "job": [{"client_address": True}],
            "user_email": [{"header": "X-User-Email", "strip": True}],
        },
        {"name": "batch", "match": {"client_cidrs": ["10.20.0.0/16", "fd00::/8"]}},
        {"name": "search", "match": {"header": {"name": "X-Costtap-App", "value": "search"}}},
    ],
}


@pytest.fixture
def apps(tmp_path: Path) -> Any:
    path = tmp_path / "costtap.yaml"
    path.write_text(yaml.safe_dump(APPS_FILE))
    return load_apps(path, "env-default", environ={"VIDEO_TOKEN": "s3cret"})


def view(
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    body: Any = None,
    client_ip: str | None = "192.0.2.10",
    proxy_user: str | None = None,
) -> CallView:
    return CallView(
        headers=Headers(
            **{name.replace("-", "_"): value for name, value in (headers or {}).items()}
        ),
        query=query or {},
        body=json.dumps(body).encode() if body is not None else b"",
        client_ip=client_ip,
        proxy_user=proxy_user,
    )


@pytest.mark.parametrize(
    ("call", "app"),
    [
        (view(proxy_user="video"), "video"),
        (view(client_ip="10.20.3.4"), "batch"),
        (view(client_ip="fd00::1"), "batch"),
        (view(headers={"X-Costtap-App": "search"}), "search"),
        (view(), "shared"),  # the file's default_app wins over COST_TRACKER_SOURCE_APP
        # Credentials come first: a header naming another app cannot override them.
        (view(proxy_user="video", headers={"X-Costtap-App": "search"}), "video"),
        (view(proxy_user="video", client_ip="10.20.3.4"), "video"),
        (view(client_ip="10.20.3.4", headers={"X-Costtap-App": "search"}), "batch"),
        # An unknown proxy user proves nothing.
        (view(proxy_user="stranger"), "shared"),
        (view(client_ip="not-an-address"), "shared"),
    ],
)
def test_recognise_app(apps: Any, call: CallView, app: str) -> None:
    assert recognise_app(apps, call) == app


@pytest.mark.parametrize(
    ("call", "user"),
    [
        (
            view(proxy_user="video", headers={"X-User-Id": "u-header"}, query={"uid": "u-query"}),
            "u-header",
        ),
        (view(proxy_user="video", query={"uid": "u-query"}, body={"user": "u-body"}), "u-query"),
        (
            view(proxy_user="video", body={"user": "u-body", "metadata": {"user_id": "u-meta"}}),
            "u-body",
        ),
        (view(proxy_user="video", body={"metadata": {"user_id": "u-meta"}}), "u-meta"),
        (view(proxy_user="video", body={"messages": [{"name": "u-list"}]}), "u-list"),
        (view(proxy_user="video", body={"user": 42}), "42"),  # numbers become strings
        (view(proxy_user="video", body={"user": ""}), "video"),  # empty is skipped
        (view(proxy_user="video", body={"user": {"id": 1}}), "video"),  # objects are not values
        (view(proxy_user="video", headers={"X-User-Id": ""}), "video"),
    ],
)
def test_user_sources_in_order(apps: Any, call: CallView, user: str) -> None:
    assert resolve_identity(apps, call).get("user") == user


def test_fixed_value_and_client_address(apps: Any) -> None:
    identity = resolve_identity(apps, view(proxy_user="video", client_ip="192.0.2.77"))

    assert identity.get("project") == "p-default"
    assert identity.get("job") == "192.0.2.77"


def test_body_path_wins_over_fixed_value(apps: Any) -> None:
    identity = resolve_identity(apps, view(proxy_user="video", body={"labels": {"project": "p-7"}}))

    assert identity.get("project") == "p-7"


def test_app_without_sources_has_no_identity(apps: Any) -> None:
    identity = resolve_identity(apps, view(client_ip="10.20.0.1", headers={"X-User-Id": "u-1"}))

    assert identity.app == "batch"
    assert identity.values == {}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("u" * 257, "longer than 256 characters (257)"),
        ("bad\nvalue", "contains control characters"),
        ("tab\tvalue", "contains control characters"),
        ("del\x7fvalue", "contains control characters"),
    ],
)
def test_invalid_value_rejected_not_truncated(apps: Any, value: str, reason: str) -> None:
    identity = resolve_identity(
        apps, view(proxy_user="video", headers={"X-User-Id": value}, query={"uid": "u-2"})
    )

    assert identity.get("user") == "u-2"
    assert identity.rejected == [("user", "header X-User-Id", reason)]


def test_value_of_256_characters_kept(apps: Any) -> None:
    identity = resolve_identity(apps, view(proxy_user="video", headers={"X-User-Id": "u" * 256}))

    assert identity.get("user") == "u" * 256
    assert identity.rejected == []


def test_headers_to_strip(apps: Any) -> None:
    headers = Headers(
        x_user_id="u-1",
        x_user_email="a@example.com",
        x_costtap_app="video",
        x_costtap_job="j",
        accept="*/*",
    )

    stripped = {name.lower() for name in headers_to_strip(apps.app("video"), headers)}

    assert stripped == {"x-user-id", "x-user-email", "x-costtap-app", "x-costtap-job"}


def test_headers_to_strip_without_app_removes_internal_only(apps: Any) -> None:
    headers = Headers(x_user_id="u-1", x_costtap_user="u")

    assert [name.lower() for name in headers_to_strip(None, headers)] == ["x-costtap-user"]


def test_no_apps_file_uses_environment_default(tmp_path: Path) -> None:
    path = tmp_path / "costtap.yaml"
    path.write_text("apps: []\n")

    apps = load_apps(path, "video-accessibility-dev", environ={})

    assert recognise_app(apps, view()) == "video-accessibility-dev"

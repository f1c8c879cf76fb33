"""Configuring SDK clients as a service would, and reading costtap's admin endpoints."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

import pytest

# Variables that would send a client anywhere but the costtap under test.
CLIENT_VARIABLES_TO_CLEAR = (
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "OPENAI_BASE_URL",
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_DIR",
)


class AdminServed(Protocol):
    admin_port: int


def route_clients_through(
    environment: pytest.MonkeyPatch,
    proxy_url: str,
    bundle: Path,
    api_keys: dict[str, str] | None = None,
) -> None:
    """Point SDK clients at costtap by environment alone: HTTPS_PROXY, SSL_CERT_FILE, keys."""
    for name in CLIENT_VARIABLES_TO_CLEAR:
        environment.delenv(name, raising=False)
    environment.setenv("HTTPS_PROXY", proxy_url)
    environment.setenv("SSL_CERT_FILE", str(bundle))
    for name, value in (api_keys or {"OPENAI_API_KEY": "sk-test-not-a-real-key"}).items():
        environment.setenv(name, value)


def admin_get(process: AdminServed, path: str) -> tuple[int, str]:
    """GET a path of costtap's admin endpoints, directly (they are plain HTTP on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{process.admin_port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric_value(process: AdminServed, series: str) -> float:
    """Return the value of one Prometheus series, such as `name{label="x"}`, or 0 when absent."""
    lines = admin_get(process, "/metrics")[1].splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(series + " ")]
    return values[0] if values else 0.0

"""Settings of `costtap run` and the mitmproxy options they become."""

from __future__ import annotations

from pathlib import Path

import pytest

from costtap.config.settings import ConfigError, Upstream, load_run_settings, parse_upstream
from costtap.proxy.master import proxy_options


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "COSTTAP_LISTEN",
        "COSTTAP_DATA_DIR",
        "COSTTAP_UPSTREAM",
        "COST_TRACKER_SOURCE_APP",
    ):
        monkeypatch.delenv(name, raising=False)

    settings = load_run_settings()

    assert str(settings.listen_address) == "127.0.0.1:8080"
    assert str(settings.admin_address) == "127.0.0.1:9090"
    assert settings.data_dir == Path("costtap-data")
    assert settings.source_app == "default"
    assert settings.upstreams == {}


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTTAP_LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("COSTTAP_DATA_DIR", "/srv/env-data")
    monkeypatch.setenv("COSTTAP_UPSTREAM", "api.openai.com=https://127.0.0.1:9443/gateway/")
    monkeypatch.setenv("COST_TRACKER_SOURCE_APP", "video-accessibility-dev")

    settings = load_run_settings(listen="127.0.0.1:7001", data_dir=None)

    assert settings.listen_address.port == 7001  # the flag wins
    assert settings.data_dir == Path("/srv/env-data")
    assert settings.source_app == "video-accessibility-dev"
    assert settings.upstreams == {
        "api.openai.com": Upstream("api.openai.com", "https", "127.0.0.1", 9443, "/gateway"),
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "api.openai.com=http://127.0.0.1",
            Upstream("api.openai.com", "http", "127.0.0.1", 80, ""),
        ),
        ("API.OpenAI.com=https://[::1]:8443", Upstream("api.openai.com", "https", "::1", 8443, "")),
    ],
)
def test_parse_upstream(value: str, expected: Upstream) -> None:
    assert parse_upstream(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "api.openai.com=",
        "=https://127.0.0.1",
        "api.openai.com=https://127.0.0.1:99999",
        "api.openai.com=https://h/?q=1",
    ],
)
def test_parse_upstream_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="--upstream"):
        parse_upstream(value)


def test_proxy_options_intercept_only_providers(tmp_path: Path) -> None:
    settings = load_run_settings(listen="127.0.0.1:0", data_dir=tmp_path)

    options = proxy_options(settings)

    assert r"^(?:api\.openai\.com):\d+$" in options["allow_hosts"]
    assert options["connection_strategy"] == "lazy"
    assert options["emudhra"] is False
    assert options["emudhra_old"] is False
    assert options["listen_host"] == "127.0.0.1"
    assert options["confdir"] == str(tmp_path / "ca")

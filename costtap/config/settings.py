"""Settings of `costtap run`: flags, `COSTTAP_*` environment variables, defaults.

Flags win over the environment, which wins over the defaults. Invalid values raise
ConfigError with a one-line message that names the setting, the value and the fix.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from costtap.providers import provider_for_host

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN = "127.0.0.1:9090"
DEFAULT_DATA_DIR = Path("costtap-data")
DEFAULT_APP = "default"


class ConfigError(Exception):
    """Invalid setting. The message names the setting and the fix."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Replacement destination for one provider host's traffic."""

    provider_host: str
    scheme: str
    host: str
    port: int
    path_prefix: str


def parse_address(value: str, setting: str) -> Address:
    """Parse HOST:PORT (IPv6 as [HOST]:PORT); port 0 picks a free port."""
    host, separator, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"{setting}: invalid address {value!r}, expected HOST:PORT such as 127.0.0.1:8080"
        )
    return Address(host, int(port_text))


def parse_upstream(value: str) -> Upstream:
    """Parse HOST=URL, as in `api.openai.com=https://127.0.0.1:8443`."""
    provider_host, separator, url = value.partition("=")
    provider_host = provider_host.strip().lower()
    example = "expected HOST=URL such as api.openai.com=https://127.0.0.1:8443"
    if not separator or not provider_host or not url:
        raise ConfigError(f"--upstream: invalid value {value!r}, {example}")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise ConfigError(f"--upstream: invalid URL {url!r} ({error}), {example}") from error
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--upstream: invalid URL {url!r}, {example}")
    if parts.query or parts.fragment:
        raise ConfigError(f"--upstream: URL {url!r} must not have a query or fragment")
    default_port = 443 if parts.scheme == "https" else 80
    return Upstream(
        provider_host=provider_host,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or default_port,
        path_prefix=parts.path.rstrip("/"),
    )


class RunSettings(BaseSettings):
    """Everything `costtap run` needs, validated."""

    model_config = SettingsConfigDict(env_prefix="COSTTAP_", extra="ignore")

    listen: str = DEFAULT_LISTEN
    admin: str = DEFAULT_ADMIN
    data_dir: Path = DEFAULT_DATA_DIR
    apps: Path = Path("costtap.yaml")
    # In the environment, COSTTAP_UPSTREAM takes a comma-separated list of HOST=URL.
    upstream: Annotated[list[str], NoDecode] = Field(default_factory=list)
    upstream_ca: Path | None = None
    source_app: str = Field(DEFAULT_APP, validation_alias="COST_TRACKER_SOURCE_APP", min_length=1)
    # Seconds a stop waits for open calls, then for the outbox to drain.
    stop_timeout: float = Field(10.0, gt=0, le=600)
    flush_timeout: float = Field(5.0, ge=0, le=600)

    @field_validator("upstream", mode="before")
    @classmethod
    def _split_upstreams(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def listen_address(self) -> Address:
        return parse_address(self.listen, "--listen")

    @property
    def admin_address(self) -> Address:
        return parse_address(self.admin, "--admin")

    @property
    def upstreams(self) -> dict[str, Upstream]:
        parsed = [parse_upstream(value) for value in self.upstream]
        return {upstream.provider_host: upstream for upstream in parsed}


def load_run_settings(**flags: Any) -> RunSettings:
    """Build the settings from flags (None means not given) and the environment.

    Raises ConfigError for any invalid value, with every check done before start.
    """
    flag_values = {name: value for name, value in flags.items() if value not in (None, [])}
    try:
        settings = RunSettings(**flag_values)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        raise ConfigError(
            f"invalid setting {field}: {first['msg']} (value {first.get('input')!r})"
        ) from error
    # Parse once now so that a bad value stops costtap before it starts listening.
    settings.listen_address  # noqa: B018
    settings.admin_address  # noqa: B018
    upstreams = settings.upstreams
    if settings.upstream_ca is not None:
        _check_ca_file(settings.upstream_ca)
    for provider_host in upstreams:
        if provider_for_host(provider_host) is None:
            raise ConfigError(
                f"--upstream: {provider_host!r} is not a provider host that costtap intercepts; "
                "see the metered endpoints table in docs/providers.md"
            )
    return settings


def _check_ca_file(path: Path) -> None:
    """Raise ConfigError unless `path` is a readable file of PEM certificates."""
    if not path.is_file():
        raise ConfigError(f"--upstream-ca: file {str(path)!r} not found")
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigError(
            f"--upstream-ca: {str(path)!r} contains no usable PEM certificate ({error}); "
            "pass the CA certificate, not a key"
        ) from error

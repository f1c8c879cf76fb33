"""The apps file: which app each call belongs to, and where its identity comes from.

The file is YAML, validated with pydantic. An invalid file raises AppsFileError with the
file, the line and the field, so that an operator can fix it without guessing. Proxy tokens
are `${ENV_VAR}` references, resolved at load time, never written in the file itself.

    default_app: shared-tools          # optional, else COST_TRACKER_SOURCE_APP
    require_proxy_auth: false
    apps:
      - name: video-accessibility
        match:
          proxy_user: video
          proxy_token: ${VIDEO_PROXY_TOKEN}
          client_cidrs: [10.1.0.0/16]
          header: {name: X-Costtap-App, value: video}
        user:
          - header: X-User-Id
            strip: true
          - body: user
        project:
          - value: p-7
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IDENTITY_FIELDS = ("user", "project", "job", "user_email", "user_name", "project_name")
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class AppsFileError(Exception):
    """The apps file is missing, not YAML, or invalid. The message names file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """One place to read an identity value from. Exactly one kind is set."""

    header: str | None = None
    query: str | None = None
    # A dotted path into the JSON request body, such as `metadata.user_id` or `labels.user`.
    body: str | None = None
    proxy_user: Literal[True] | None = None
    client_address: Literal[True] | None = None
    value: str | None = None
    # Remove the header before the request goes upstream (header sources only).
    strip: bool = False

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> Source:
        kinds = [
            name
            for name in ("header", "query", "body", "proxy_user", "client_address", "value")
            if getattr(self, name) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "each source needs exactly one of header, query, body, proxy_user, "
                f"client_address, value (found {', '.join(kinds) or 'none'})"
            )
        if self.strip and self.header is None:
            raise ValueError("strip: true applies to header sources only")
        if self.header is not None and not _HEADER_NAME.match(self.header):
            raise ValueError(f"invalid header name {self.header!r}")
        return self


class HeaderMatch(_Strict):
    name: str
    value: str


class Match(_Strict):
    """Rules that recognise an app's traffic, checked in the order of the fields."""

    proxy_user: str | None = None
    proxy_token: str | None = None
    client_cidrs: list[str] = Field(default_factory=list)
    header: HeaderMatch | None = None

    @field_validator("proxy_token")
    @classmethod
    def _token_is_reference(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_REFERENCE.match(value):
            raise ValueError("proxy_token must be an ${ENV_VAR} reference, never the token itself")
        return value

    @field_validator("client_cidrs")
    @classmethod
    def _valid_networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as error:
                raise ValueError(f"invalid CIDR {value!r}: {error}") from error
        return values

    @model_validator(mode="after")
    def _user_and_token_together(self) -> Match:
        if (self.proxy_user is None) != (self.proxy_token is None):
            raise ValueError("proxy_user and proxy_token must be given together")
        return self


SourceList = Annotated[list[Source], Field(default_factory=list)]


class App(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
    match: Match = Field(default_factory=Match)
    user: SourceList
    project: SourceList
    job: SourceList
    user_email: SourceList
    user_name: SourceList
    project_name: SourceList
    # What to do when the tracker cannot be reached before a call.
    tracker_unreachable: Literal["allow", "deny"] = "allow"


class Budget(_Strict):
    """A spending limit over a calendar window (UTC), checked before each call."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    scope: Literal["all", "app", "project", "user"] = "all"
    # The app, project or user the budget applies to; omitted, each one gets its own budget.
    id: str | None = Field(default=None, min_length=1)
    window: Literal["month", "day"] = "month"
    amount_usd: Annotated[float, Field(gt=0)]
    # Fractions of the amount at which a warning (and webhook) fires, once per window.
    thresholds: list[Annotated[float, Field(gt=0, le=10)]] = Field(
        default_factory=lambda: [0.5, 0.8, 1.0]
    )
    # A hard budget denies a call whose estimate would exceed what is left.
    hard: bool = True
    # While in flight, a call whose request does not bound its cost (no output cap, media
    # input, tools the provider runs) counts as this many times its estimate.
    unbounded_call_factor: Annotated[float, Field(ge=1, le=1000)] = 4.0

    @model_validator(mode="after")
    def _id_needs_scope(self) -> Budget:
        if self.scope == "all" and self.id is not None:
            raise ValueError("a budget with scope all takes no id")
        return self


class PriceEntry(_Strict):
    """A price for some models of a provider: a rate per unit, or a discount on the list price."""

    provider: str = Field(min_length=1)
    # Model names, with shell-style wildcards (`gpt-4o*`, `*-Standard-*`).
    models: list[str] = Field(min_length=1)
    per_1k_chars: float | None = Field(default=None, ge=0)
    per_1m_chars: float | None = Field(default=None, ge=0)
    per_hour: float | None = Field(default=None, ge=0)
    per_image: float | None = Field(default=None, ge=0)
    input_per_mtok: float | None = Field(default=None, ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)
    output_per_mtok: float | None = Field(default=None, ge=0)
    audio_input_per_mtok: float | None = Field(default=None, ge=0)
    audio_output_per_mtok: float | None = Field(default=None, ge=0)
    # Fraction taken off the list price, such as 0.2 for a 20% contract discount.
    discount: float | None = Field(default=None, ge=0, lt=1)
    # Output tokens assumed by estimates when a request sets no output cap.
    default_output_tokens: int | None = Field(default=None, gt=0)
    source: str | None = None
    date: datetime.date | None = None

    @model_validator(mode="after")
    def _something_to_price(self) -> PriceEntry:
        rates = [name for name in _RATE_FIELDS if getattr(self, name) is not None]
        if rates and self.discount is not None:
            raise ValueError("give rates or a discount, not both")
        if not rates and self.discount is None and self.default_output_tokens is None:
            raise ValueError("a price entry needs a rate, a discount or default_output_tokens")
        return self

    @property
    def has_rates(self) -> bool:
        return any(getattr(self, name) is not None for name in _RATE_FIELDS)


_RATE_FIELDS = (
    "per_1k_chars",
    "per_1m_chars",
    "per_hour",
    "per_image",
    "input_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "output_per_mtok",
    "audio_input_per_mtok",
    "audio_output_per_mtok",
)


class AppsFile(_Strict):
    default_app: str | None = Field(default=None, min_length=1)
    require_proxy_auth: bool = False
    apps: list[App] = Field(default_factory=list)
    budgets: list[Budget] = Field(default_factory=list)
    # Contract prices and discounts; they win over the list prices costtap ships with.
    prices: list[PriceEntry] = Field(default_factory=list)
    # URL that receives a JSON POST when a budget threshold is crossed.
    alert_webhook: str | None = Field(default=None, pattern=r"^https?://")

    @model_validator(mode="after")
    def _unique_names(self) -> AppsFile:
        seen: set[str] = set()
        for app in self.apps:
            if app.name in seen:
                raise ValueError(f"app name {app.name!r} is used twice")
            seen.add(app.name)
        users = [app.match.proxy_user for app in self.apps if app.match.proxy_user]
        if len(users) != len(set(users)):
            raise ValueError("a proxy_user may belong to one app only")
        budget_names = [budget.name for budget in self.budgets]
        if len(budget_names) != len(set(budget_names)):
            raise ValueError("budget names must be unique")
        return self


@dataclass(frozen=True)
class LoadedApps:
    """A validated apps file with its proxy tokens resolved from the environment."""

    path: Path | None
    config: AppsFile
    default_app: str
    # The default app when the file names none (COST_TRACKER_SOURCE_APP), kept for reloads.
    default_app_fallback: str
    # proxy user -> (app name, token)
    tokens: dict[str, tuple[str, str]]
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]

    def app(self, name: str) -> App | None:
        for app in self.config.apps:
            if app.name == name:
                return app
        return None


def empty_apps(default_app: str) -> LoadedApps:
    """Return the configuration used when no apps file exists: every call goes to one app."""
    return LoadedApps(None, AppsFile(), default_app, default_app, {}, ())


def load_apps(
    path: Path, default_app: str, environ: dict[str, str] | None = None, resolve_tokens: bool = True
) -> LoadedApps:
    """Read and validate `path`; raise AppsFileError naming file, line and field.

    With `resolve_tokens` false, proxy tokens are not read from the environment: for
    commands that only need budgets or prices.
    """
    environment = dict(os.environ) if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise AppsFileError(
            f"{path}: cannot read the apps file: {error.strerror or error}"
        ) from error
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise AppsFileError(f"{path}{position}: invalid YAML: {problem}") from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AppsFileError(f"{path}:1: the apps file must be a mapping with an `apps` list")
    try:
        config = AppsFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(first["loc"])
        line = _line_of(node, location)
        field = ".".join(str(part) for part in location) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field; check its spelling"
        raise AppsFileError(f"{path}:{line}: {field}: {message}") from error

    tokens: dict[str, tuple[str, str]] = {}
    networks = []
    for index, app in enumerate(config.apps):
        if (
            resolve_tokens
            and app.match.proxy_user is not None
            and app.match.proxy_token is not None
        ):
            reference = _ENV_REFERENCE.match(app.match.proxy_token)
            assert reference is not None
            variable = reference.group(1)
            token = environment.get(variable, "")
            if not token:
                line = _line_of(node, ("apps", index, "match", "proxy_token"))
                raise AppsFileError(
                    f"{path}:{line}: apps.{index}.match.proxy_token: environment variable "
                    f"{variable} is not set or empty; set it to the app's proxy token"
                )
            tokens[app.match.proxy_user] = (app.name, token)
        for cidr in app.match.client_cidrs:
            networks.append((ipaddress.ip_network(cidr, strict=False), app.name))
    default = config.default_app or default_app
    return LoadedApps(path, config, default, default_app, tokens, tuple(networks))


def _line_of(node: yaml.Node | None, location: tuple[Any, ...]) -> int:
    """Return the 1-based line of the deepest YAML key or list item along `location`."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in location:
        if isinstance(node, yaml.MappingNode):
            pair = next(((key, value) for key, value in node.value if key.value == part), None)
            if pair is None:
                break
            line = pair[0].start_mark.line + 1
            node = pair[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def describe(apps: LoadedApps) -> dict[str, Any]:
    """Return the effective settings as plain data, with every secret hidden."""
    described = apps.config.model_dump(mode="json", exclude_defaults=False)
    for app in described["apps"]:
        token = app["match"].get("proxy_token")
        if token:
            app["match"]["proxy_token"] = f"{token} (set, hidden)"
    described["default_app"] = apps.default_app
    described["file"] = str(apps.path) if apps.path else None
    return described

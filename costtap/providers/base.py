"""Shared vocabulary of the provider modules: units, routes and parser results.

Everything here is pure data and arithmetic. Provider modules never import mitmproxy and
never do I/O, so each one is tested by feeding it bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Protocol

# Characters per token used for rough input estimates, the usual figure for English text
# with OpenAI's and Google's tokenizers. Estimates are always marked as such in the ledger.
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class Units:
    """Billed usage of one call in costtap's unit vocabulary.

    Detail fields are parts of their totals, never additions: `cached_input_tokens`,
    `cache_write_tokens` and `audio_input_tokens` are inside `input_tokens`;
    `reasoning_tokens` and `audio_output_tokens` are inside `output_tokens`.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    chars: int = 0
    seconds: float = 0
    images: int = 0
    credits: float = 0

    def to_dict(self) -> dict[str, int | float]:
        """Return the non-zero fields, the form sent in records and stored in the ledger."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name))}

    @classmethod
    def from_dict(cls, data: dict[str, int | float]) -> Units:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})  # type: ignore[arg-type]

    def is_empty(self) -> bool:
        return not self.to_dict()


@dataclass(frozen=True, slots=True)
class Route:
    """An endpoint matched from a request's host, method and path."""

    provider: str
    endpoint: str
    # Free calls (token counting, moderation, listings) pass through without spend.
    free: bool = False
    # The model or deployment named in the URL path (Gemini, Vertex AI, Azure OpenAI).
    path_model: str | None = None


@dataclass(slots=True)
class RequestInfo:
    """Model, stream flag and estimate read from a request body before it leaves."""

    model: str | None = None
    streaming: bool = False
    estimate: Units = field(default_factory=Units)
    # The rewritten body to send upstream, or None to send the client's bytes unchanged.
    upstream_body: bytes | None = None
    # costtap asked the provider for usage the client did not ask for, so the extra usage
    # data must be removed from the response before the client sees it.
    hide_usage_from_client: bool = False
    # The request set no output cap: the estimate's output tokens are a default, which a
    # per-model default in the price overlay may replace.
    output_is_default: bool = False
    # The maximum the request can be billed (see `costtap.providers.ceiling`), or None when
    # the request does not bound it.
    ceiling: Units | None = None


@dataclass(slots=True)
class MeterResult:
    """The outcome of parsing one response."""

    model: str | None
    units: Units
    # True when the provider reported the units; False when they are an estimate.
    usage_reported: bool
    estimate_reason: str | None = None


class ResponseParser(Protocol):
    """Incremental reader of a decoded response body.

    `feed` takes chunks split at arbitrary points; `finish` is called once, at the end of the
    body or when the response was cut short. Neither may raise on malformed input.
    """

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> MeterResult: ...


class ClientStreamFilter(Protocol):
    """Rewriter of the decoded bytes sent to the client, with the same feed/finish shape."""

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Provider(Protocol):
    """One provider module: what it meters and how it reads requests and responses."""

    name: str
    # Regular expressions matched against the whole lower-case host name.
    host_patterns: tuple[str, ...]

    def match(self, host: str, method: str, path: str) -> Route | None: ...

    def read_request(
        self, route: Route, body: bytes, headers: Mapping[str, str]
    ) -> RequestInfo: ...

    def response_parser(
        self, route: Route, request: RequestInfo, headers: Mapping[str, str]
    ) -> ResponseParser: ...

    def client_filter(self, route: Route) -> ClientStreamFilter | None:
        """Return the rewriter that hides usage costtap requested, if the provider has one."""
        ...

    def deny_body(self, message: str) -> bytes:
        """Return a JSON error body shaped like the provider's own, for a denied call."""
        ...


class WebSocketMeter(Protocol):
    """Reader of one WebSocket connection's messages, in both directions.

    Each method returns the results that are complete at that point: one per response for
    APIs that report usage per response, or one per connection from `finish`.
    """

    def client_message(self, content: bytes, is_text: bool) -> list[MeterResult]: ...

    def server_message(self, content: bytes, is_text: bool) -> list[MeterResult]: ...

    def finish(self) -> list[MeterResult]: ...


def media_type(headers: Mapping[str, str]) -> str:
    """Return the lower-case media type of a Content-Type header, without parameters."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def estimate_tokens_from_chars(chars: int) -> int:
    """Return a token estimate for `chars` characters of text, at least 1 for non-empty text."""
    if chars <= 0:
        return 0
    return max(1, -(-chars // CHARS_PER_TOKEN))

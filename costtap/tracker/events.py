"""The record of one metered call, as stored in the ledger and sent to a tracker."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from costtap.providers.base import Units


class Status(StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"
    DENIED = "denied"


def new_request_id() -> str:
    return str(uuid.uuid4())


def format_time(moment: datetime) -> str:
    """Format a time as the ledger stores it: UTC, microseconds, sortable as text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True)
class UsageEvent:
    request_id: str
    time: datetime
    app: str
    provider: str
    endpoint: str
    model: str | None
    units: Units
    status: Status
    estimated: bool
    latency_ms: int | None = None
    ttfb_ms: int | None = None
    http_status: int | None = None
    estimate_reason: str | None = None
    user: str | None = None
    project: str | None = None
    job: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def extra_identity(identity: dict[str, str]) -> dict[str, str]:
    """Return the identity fields beyond user, project and job (names and emails)."""
    return {
        name: value for name, value in identity.items() if name not in ("user", "project", "job")
    }

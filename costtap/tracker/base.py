"""The tracker interface the proxy talks to, whatever keeps the records.

Two implementations: `LocalTracker` (the embedded ledger, with budgets) and
`RemoteTracker` (the central cost-tracker API, through a durable outbox).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from costtap.providers.base import Units
from costtap.tracker.events import UsageEvent


@dataclass(frozen=True)
class PreflightCall:
    """The facts of a call known before it leaves."""

    request_id: str
    app: str
    user: str | None
    project: str | None
    job: str | None
    provider: str
    model: str | None
    estimate: Units
    # The app's policy when the tracker cannot be reached.
    unreachable_policy: Literal["allow", "deny"] = "allow"
    # The request set no output cap, so the estimate's output tokens are a default.
    output_is_default: bool = False
    # The maximum the call can be billed, when its request bounds it.
    ceiling: Units | None = None


@dataclass(frozen=True)
class Decision:
    allow: bool
    # The tracker's request id, else costtap's own: the record's idempotency key.
    request_id: str
    reason: str | None = None
    estimated_cost_usd: float | None = None
    # "tracker" when the tracker decided, "policy" when it could not be asked.
    decided_by: Literal["tracker", "policy"] = "tracker"
    # The call was denied only because calls in flight did not finish in time, so the same
    # call may be admitted later.
    retry_later: bool = False


class Tracker(Protocol):
    async def start(self) -> None:
        """Open storage and start background work; raise TrackerError when impossible."""
        ...

    async def preflight(self, call: PreflightCall) -> Decision: ...

    async def record(self, event: UsageEvent) -> None:
        """Store the event durably before returning; deliver it later if remote."""
        ...

    def readiness(self) -> str | None:
        """Return None when ready, else the reason it is not."""
        ...

    def pending_records(self) -> int: ...

    def stop_admitting(self) -> None:
        """Deny the calls waiting for admission, because costtap is stopping."""
        ...

    async def stop(self, flush_seconds: float) -> None: ...


class TrackerError(Exception):
    """The tracker's storage cannot be opened or written."""

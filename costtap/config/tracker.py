"""Settings of remote mode, from the same variables the hand-written integrations use.

`COST_TRACKER_BASE_URL` turns remote mode on; `COST_TRACKER_API_KEY` is then required.
Mistakes here are common and silent elsewhere (a key with a leading space in an env file),
so each is checked at start and the effective settings are logged with the key hidden.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from costtap.config.settings import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_PREFLIGHT_TIMEOUT = 1.5
DEFAULT_RECORD_TIMEOUT = 10.0
_KEY_PATTERN = re.compile(r"^ct_[a-z]+_\S{20,}$")


@dataclass(frozen=True)
class TrackerSettings:
    base_url: str
    api_key: str
    preflight_timeout: float = DEFAULT_PREFLIGHT_TIMEOUT
    record_timeout: float = DEFAULT_RECORD_TIMEOUT

    def url(self, endpoint: str) -> str:
        return f"{self.base_url}/{endpoint.lstrip('/')}"

    @property
    def hidden_key(self) -> str:
        """Return the key as logs may show it: its kind prefix only."""
        prefix = self.api_key.split("_", 2)
        return f"{prefix[0]}_{prefix[1]}_…" if len(prefix) == 3 else "…"


def load_tracker_settings(environ: dict[str, str]) -> TrackerSettings | None:
    """Return remote-mode settings, or None when COST_TRACKER_BASE_URL is not set.

    Raises ConfigError for an invalid URL, a missing or malformed key, or a bad timeout.
    """
    raw_url = environ.get("COST_TRACKER_BASE_URL", "").strip()
    if not raw_url:
        return None
    parts = urlsplit(raw_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"COST_TRACKER_BASE_URL: invalid URL {raw_url!r}, expected the base URL with its version, "
            "such as https://tracker.example.internal/cost-tracker/v1"
        )

    raw_key = environ.get("COST_TRACKER_API_KEY")
    if raw_key is None or not raw_key.strip():
        raise ConfigError(
            "COST_TRACKER_API_KEY is missing: remote mode needs the tracker's API key"
        )
    key = raw_key.strip()
    if key != raw_key:
        logger.warning(
            "COST_TRACKER_API_KEY had surrounding white space, which was removed; fix the env file"
        )
    if not _KEY_PATTERN.match(key):
        raise ConfigError(
            "COST_TRACKER_API_KEY is malformed: tracker keys look like ct_live_ followed by 20 or more "
            "characters, with no white space inside"
        )

    preflight_timeout = _seconds(environ, "COSTTAP_PREFLIGHT_TIMEOUT", DEFAULT_PREFLIGHT_TIMEOUT)
    record_timeout = _seconds(environ, "COSTTAP_RECORD_TIMEOUT", DEFAULT_RECORD_TIMEOUT)
    return TrackerSettings(raw_url.rstrip("/"), key, preflight_timeout, record_timeout)


def _seconds(environ: dict[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError as error:
        raise ConfigError(f"{name}: invalid number of seconds {raw!r}") from error
    if not 0 < value <= 300:
        raise ConfigError(
            f"{name}: {raw} is out of range; use a number of seconds above 0 and up to 300"
        )
    return value

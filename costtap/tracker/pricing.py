"""Prices of metered units, from the snapshot that ships with genai-prices.

The snapshot is read from the installed package: nothing is fetched at start or later.
A model the snapshot does not know is unpriced (None), never priced at zero.
"""

from __future__ import annotations

import logging
import warnings
from datetime import datetime
from decimal import Decimal

from genai_prices import Usage, calc_price

from costtap.providers.base import Units

logger = logging.getLogger(__name__)


def genai_usage(units: Units) -> Usage:
    """Map costtap's units onto genai-prices' usage fields.

    Both count cached, cache-write and audio input tokens inside `input_tokens`, and audio
    output inside `output_tokens`, so the totals pass through as they are.
    """
    return Usage(
        input_tokens=units.input_tokens,
        cache_read_tokens=units.cached_input_tokens,
        cache_write_tokens=units.cache_write_tokens,
        input_audio_tokens=units.audio_input_tokens,
        output_tokens=units.output_tokens,
        output_audio_tokens=units.audio_output_tokens,
    )


# costtap's provider names -> genai-prices provider ids. None: genai-prices has no prices
# for the provider, so its calls need the price overlay.
GENAI_PROVIDERS: dict[str, str | None] = {
    "openai": "openai",
    "azure-openai": "azure",
    "gemini": "google",
    "vertex-ai": "google",
    "anthropic": "anthropic",
    "elevenlabs": "elevenlabs",
    "google-tts": None,
}


class Pricer:
    """Price token usage; warn once for each (provider, model) that has no price."""

    def __init__(self) -> None:
        self.unpriced: set[tuple[str, str]] = set()

    def price(
        self, provider: str, model: str | None, units: Units, when: datetime
    ) -> Decimal | None:
        if units.is_empty():
            return Decimal(0)
        if model is None:
            self._warn_unpriced(provider, "<unknown model>", "the call named no model")
            return None
        if units.chars or units.seconds or units.images:
            # NOTE: characters, seconds and images need the price overlay, not built yet.
            self._warn_unpriced(
                provider, model, "no price source for characters, seconds or images"
            )
            return None
        # An unknown provider name (a record from another client) lets genai-prices match
        # the model alone.
        provider_id = GENAI_PROVIDERS.get(provider, provider or None) if provider else None
        if provider and provider in GENAI_PROVIDERS and provider_id is None:
            self._warn_unpriced(provider, model, "no price source for this provider")
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = calc_price(
                    genai_usage(units), model, provider_id=provider_id, genai_request_timestamp=when
                )
        except LookupError:
            self._warn_unpriced(provider, model, "genai-prices has no price for it")
            return None
        except (ValueError, TypeError) as error:
            self._warn_unpriced(provider, model, f"genai-prices failed: {error}")
            return None
        return result.total_price

    def _warn_unpriced(self, provider: str, model: str, reason: str) -> None:
        key = (provider, model)
        if key in self.unpriced:
            return
        self.unpriced.add(key)
        logger.warning(
            "model %s of %s is unpriced (%s): its cost is recorded as null", model, provider, reason
        )

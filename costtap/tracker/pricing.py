"""Prices of metered units: contract prices, then costtap's overlay, then genai-prices.

1. An operator's `prices:` entry in the apps file wins: its rates, or a discount taken off
   the list price.
2. The overlay that ships with costtap (`costtap/data/prices.yaml`) prices what
   genai-prices does not carry: characters, hours of audio and images of some models.
3. genai-prices prices tokens (with tiers such as long-context rates, cached and
   cache-write rates), and characters or audio seconds where its snapshot has them.

Nothing is fetched: genai-prices' bundled snapshot is used as installed. A call no source
can price is unpriced (None), with one warning per model, and never priced at zero or at a
neighbouring model's price.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from functools import cache
from importlib import resources

import yaml
from genai_prices import Usage, calc_price

from costtap.config.apps import PriceEntry
from costtap.providers.base import Units

logger = logging.getLogger(__name__)

# costtap's provider names -> genai-prices provider ids. None: genai-prices has no prices
# for the provider, so its calls need the overlay.
GENAI_PROVIDERS: dict[str, str | None] = {
    "openai": "openai",
    "azure-openai": "azure",
    "gemini": "google",
    "vertex-ai": "google",
    "anthropic": "anthropic",
    "elevenlabs": "elevenlabs",
    "google-tts": None,
}
_MILLION = Decimal(1_000_000)


@cache
def shipped_prices() -> tuple[PriceEntry, ...]:
    """Return the overlay that ships with costtap, validated once."""
    text = resources.files("costtap.data").joinpath("prices.yaml").read_text(encoding="utf-8")
    return tuple(PriceEntry.model_validate(entry) for entry in yaml.safe_load(text)["prices"])


def find_entry(
    entries: tuple[PriceEntry, ...] | list[PriceEntry], provider: str, model: str
) -> PriceEntry | None:
    for entry in entries:
        if entry.provider == provider and any(
            fnmatch.fnmatchcase(model, pattern) for pattern in entry.models
        ):
            return entry
    return None


def genai_usage(units: Units) -> Usage:
    """Map costtap's units onto genai-prices' usage fields.

    Both count cached, cache-write and audio input tokens inside `input_tokens`, and audio
    output inside `output_tokens`, so the totals pass through as they are.
    """
    values: dict[str, int | float] = {
        "input_tokens": units.input_tokens,
        "cache_read_tokens": units.cached_input_tokens,
        "cache_write_tokens": units.cache_write_tokens,
        "input_audio_tokens": units.audio_input_tokens,
        "output_tokens": units.output_tokens,
        "output_audio_tokens": units.audio_output_tokens,
    }
    if units.chars:
        values["input_characters"] = units.chars
    if units.seconds:
        values["audio_seconds"] = units.seconds
    return Usage(**values)


def price_from_rates(entry: PriceEntry, units: Units) -> Decimal | None:
    """Price units with an entry's rates; None when a billed unit has no rate in it."""
    total = Decimal(0)
    billed = {name for name, value in units.to_dict().items() if value}

    def add(quantity: float, rate: float | None, per: Decimal) -> bool:
        nonlocal total
        if not quantity:
            return True
        if rate is None:
            return False
        total += Decimal(str(quantity)) * Decimal(str(rate)) / per
        return True

    token_parts_priced = True
    if billed & {"input_tokens", "output_tokens"}:
        uncached = (
            units.input_tokens
            - units.cached_input_tokens
            - units.cache_write_tokens
            - units.audio_input_tokens
        )
        text_output = units.output_tokens - units.audio_output_tokens
        token_parts_priced = all(
            [
                add(uncached, entry.input_per_mtok, _MILLION),
                add(units.cached_input_tokens, entry.cached_input_per_mtok, _MILLION),
                add(units.cache_write_tokens, entry.cache_write_per_mtok, _MILLION),
                add(units.audio_input_tokens, entry.audio_input_per_mtok, _MILLION),
                add(text_output, entry.output_per_mtok, _MILLION),
                add(units.audio_output_tokens, entry.audio_output_per_mtok, _MILLION),
            ]
        )
    chars_rate, chars_per = (
        (entry.per_1k_chars, Decimal(1000))
        if entry.per_1k_chars is not None
        else (entry.per_1m_chars, _MILLION)
    )
    priced = [
        token_parts_priced,
        add(units.chars, chars_rate, chars_per),
        add(units.seconds, entry.per_hour, Decimal(3600)),
        add(units.images, entry.per_image, Decimal(1)),
    ]
    # Credits are the provider's own accounting of the same usage, never billed on top.
    return total if all(priced) else None


class Pricer:
    """Price usage; warn once for each (provider, model) that has no price."""

    def __init__(self, operator_prices: Callable[[], list[PriceEntry]] | None = None) -> None:
        self._operator_prices = operator_prices or (lambda: [])
        self.unpriced: set[tuple[str, str]] = set()

    def price(
        self, provider: str, model: str | None, units: Units, when: datetime
    ) -> Decimal | None:
        if units.is_empty():
            return Decimal(0)
        if model is None:
            self._warn_unpriced(provider, "<unknown model>", "the call named no model")
            return None
        operator = find_entry(self._operator_prices(), provider, model)
        if operator is not None and operator.has_rates:
            cost = price_from_rates(operator, units)
            if cost is None:
                self._warn_unpriced(
                    provider,
                    model,
                    f"the apps file's price for {model} misses a rate for {units.to_dict()}",
                )
            return cost
        cost = self._list_price(provider, model, units, when)
        if cost is not None and operator is not None and operator.discount is not None:
            cost = cost * (Decimal(1) - Decimal(str(operator.discount)))
        return cost

    def _list_price(
        self, provider: str, model: str, units: Units, when: datetime
    ) -> Decimal | None:
        shipped = find_entry(shipped_prices(), provider, model)
        if shipped is not None and shipped.has_rates:
            cost = price_from_rates(shipped, units)
            if cost is not None:
                return cost
        if provider in GENAI_PROVIDERS and GENAI_PROVIDERS[provider] is None:
            self._warn_unpriced(
                provider, model, "no price for this model in costtap's price overlay"
            )
            return None
        # An unknown provider name (a record from another client) lets genai-prices match
        # the model alone.
        provider_id = GENAI_PROVIDERS.get(provider, provider) or None
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
        if result.total_price == 0:
            # genai-prices has the model but no rate for these units (characters of a
            # token-priced model, say), and zero would hide real spend.
            self._warn_unpriced(provider, model, f"genai-prices has no price for {units.to_dict()}")
            return None
        return result.total_price

    def default_output_tokens(self, provider: str, model: str | None) -> int | None:
        """Return the per-model output estimate the apps file or the overlay sets, if any."""
        if model is None:
            return None
        for entries in (self._operator_prices(), list(shipped_prices())):
            entry = find_entry(entries, provider, model)
            if entry is not None and entry.default_output_tokens is not None:
                return entry.default_output_tokens
        return None

    def _warn_unpriced(self, provider: str, model: str, reason: str) -> None:
        key = (provider, model)
        if key in self.unpriced:
            return
        self.unpriced.add(key)
        logger.warning(
            "model %s of %s is unpriced (%s): its cost is recorded as null", model, provider, reason
        )

"""Pricing rules: tiers, cache rates, the shipped overlay, contract prices and discounts.

Rates are list prices in USD per million tokens as collected in the genai-prices 0.2.3
snapshot on 2026-12-04, unless an entry names another source.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from costtap.config.apps import PriceEntry
from costtap.providers.base import Units
from costtap.tracker.pricing import Pricer, price_from_rates, shipped_prices

M = 1_000_000
NOW = datetime(2026, 12, 4, tzinfo=UTC)


@pytest.mark.parametrize(
    ("provider", "model", "units", "expected"),
    [
        # gemini-2.5-pro: $1.25 in and $10 out up to 200k prompt tokens, $2.50 and $15 above.
        (
            "gemini",
            "gemini-2.5-pro",
            Units(input_tokens=150_000, output_tokens=1000),
            150_000 * 1.25 / M + 1000 * 10 / M,
        ),
        (
            "gemini",
            "gemini-2.5-pro",
            Units(input_tokens=250_000, output_tokens=1000),
            250_000 * 2.50 / M + 1000 * 15 / M,
        ),
        # claude-sonnet-4-5: $3 in, $0.30 cache read, $3.75 cache write (5 minutes), $15 out.
        (
            "anthropic",
            "claude-sonnet-4-5",
            Units(
                input_tokens=10_000,
                cached_input_tokens=2000,
                cache_write_tokens=3000,
                output_tokens=100,
            ),
            5000 * 3.00 / M + 2000 * 0.30 / M + 3000 * 3.75 / M + 100 * 15.00 / M,
        ),
        # tts-1: $15 per million characters; whisper-1: $0.36 an hour.
        ("openai", "tts-1", Units(chars=1000), 1000 * 15 / M),
        ("openai", "whisper-1", Units(seconds=90), 90 * 0.36 / 3600),
        # Azure OpenAI is priced from genai-prices' azure provider: gpt-4o $2.50 in, $10 out.
        (
            "azure-openai",
            "gpt-4o-2024-08-06",
            Units(input_tokens=1000, output_tokens=100),
            1000 * 2.5 / M + 100 * 10 / M,
        ),
    ],
)
def test_list_prices(provider: str, model: str, units: Units, expected: float) -> None:
    assert float(Pricer().price(provider, model, units, NOW) or -1) == pytest.approx(
        expected, rel=1e-9
    )


@pytest.mark.parametrize(
    ("provider", "model", "units"),
    [
        ("openai", "gpt-4o-mini-tts", Units(chars=45)),  # token-priced: no character rate
        ("openai", "no-such-model", Units(input_tokens=10)),
        ("google-tts", "en-US-Neural2-C", Units(chars=10)),  # no published rate in the overlay
        ("elevenlabs", "eleven_unknown_v9", Units(chars=10)),
        ("openai", None, Units(input_tokens=10)),
    ],
)
def test_unpriced_is_none_not_zero(provider: str, model: str | None, units: Units) -> None:
    assert Pricer().price(provider, model, units, NOW) is None


def test_empty_units_cost_nothing() -> None:
    assert Pricer().price("openai", None, Units(), NOW) == Decimal(0)


def test_shipped_overlay_states_source_and_date() -> None:
    entries = shipped_prices()

    assert entries
    assert all(entry.source and entry.date for entry in entries)


def test_contract_rates_win_over_list_price() -> None:
    contract = PriceEntry(
        provider="openai", models=["gpt-4o*"], input_per_mtok=2.0, output_per_mtok=8.0
    )
    pricer = Pricer(lambda: [contract])

    cost = pricer.price(
        "openai", "gpt-4o-2024-08-06", Units(input_tokens=1000, output_tokens=100), NOW
    )

    assert float(cost or -1) == pytest.approx(1000 * 2.0 / M + 100 * 8.0 / M)


def test_contract_discount_on_list_price() -> None:
    discount = PriceEntry(provider="elevenlabs", models=["eleven_*"], discount=0.25)
    pricer = Pricer(lambda: [discount])

    cost = pricer.price("elevenlabs", "eleven_multilingual_v2", Units(chars=1000), NOW)

    # $0.10 per 1,000 characters, less 25%.
    assert float(cost or -1) == pytest.approx(0.10 * 0.75)


def test_contract_rate_missing_for_billed_unit_is_unpriced() -> None:
    chars_only = PriceEntry(provider="openai", models=["gpt-4o"], per_1m_chars=1.0)

    assert (
        Pricer(lambda: [chars_only]).price("openai", "gpt-4o", Units(input_tokens=5), NOW) is None
    )


def test_rates_split_cached_and_audio_parts() -> None:
    entry = PriceEntry(
        provider="x",
        models=["m"],
        input_per_mtok=1.0,
        cached_input_per_mtok=0.1,
        audio_input_per_mtok=10.0,
        output_per_mtok=2.0,
        audio_output_per_mtok=20.0,
    )
    units = Units(
        input_tokens=100,
        cached_input_tokens=30,
        audio_input_tokens=20,
        output_tokens=50,
        audio_output_tokens=10,
    )

    cost = price_from_rates(entry, units)

    # 50 plain input at $1, 30 cached at $0.10, 20 audio at $10; 40 text out at $2, 10 audio at $20.
    assert float(cost or -1) == pytest.approx((50 * 1 + 30 * 0.1 + 20 * 10 + 40 * 2 + 10 * 20) / M)


def test_default_output_tokens_from_contract_entry() -> None:
    entry = PriceEntry(provider="openai", models=["o3*"], default_output_tokens=4000)

    assert Pricer(lambda: [entry]).default_output_tokens("openai", "o3-mini") == 4000
    assert Pricer(lambda: [entry]).default_output_tokens("openai", "gpt-4o") is None

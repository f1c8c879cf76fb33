"""Measure how far costtap's input-token estimates are from the billed counts on the corpus.

Run from the repository root: `python bench/estimate_error.py`. For every recorded case
with a request body and a reported input count, it prints the estimate (4 characters a
token over the request's text), the billed count and the error, then the median and mean
absolute error. Nothing is timed and nothing leaves the machine.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from costtap.providers import provider_for_host
from tests.support.corpus import all_cases
from tests.test_corpus_e2e import build_exchange, case_url


def main() -> None:
    errors: list[float] = []
    print(f"{'case':55} {'estimate':>8} {'billed':>8} {'error':>8}")
    for case in all_cases():
        expected = case.expected
        units = expected.get("units") or {}
        if (
            not case.has(".request.json")
            or not units.get("input_tokens")
            or case.has(".frames.jsonl")
        ):
            continue
        host = case_url(case).hostname or ""
        provider = provider_for_host(host)
        if provider is None:
            continue
        exchange = build_exchange(case)
        route = provider.match(host, exchange.method, exchange.path)
        if route is None or route.free:
            continue
        estimate = provider.read_request(
            route, exchange.request_body, exchange.request_headers
        ).estimate.input_tokens
        billed = units["input_tokens"]
        error = (estimate - billed) / billed
        errors.append(abs(error))
        print(f"{case.id:55} {estimate:8d} {billed:8d} {error:+8.0%}")
    print(
        f"\n{len(errors)} cases: median absolute error {statistics.median(errors):.0%}, mean {statistics.mean(errors):.0%}"
    )


if __name__ == "__main__":
    main()

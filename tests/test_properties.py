"""Properties of every provider parser and of the response tap, over the recorded corpus.

- Any split of a recorded body into chunks gives the same result as the whole body.
- Random, truncated and malformed bodies never raise out of a parser.
- The tap hands the client exactly the upstream's bytes, however they are split.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costtap.addons.metering import ResponseTap
from costtap.providers import provider_for_host
from costtap.providers.base import MeterResult
from costtap.providers.decoding import make_decoder
from tests.support.corpus import Case, all_cases
from tests.test_corpus_e2e import build_exchange, build_reply, case_url

EXAMPLES = 500
HTTP_CASES = [case for case in all_cases() if not case.has(".frames.jsonl")]
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def parse(case: Case, body: bytes, cuts: list[int]) -> MeterResult | None:
    """Run the case's request and response through its provider's parser, split at `cuts`."""
    url = case_url(case)
    host = url.hostname or ""
    provider = provider_for_host(host)
    assert provider is not None, case.id
    exchange = build_exchange(case)
    route = provider.match(host, exchange.method, exchange.path)
    if route is None or route.free:
        return None
    request = provider.read_request(route, exchange.request_body, exchange.request_headers)
    parser = provider.response_parser(route, request, exchange.reply.headers)
    for chunk in split_at(body, cuts):
        parser.feed(chunk)
    return parser.finish()


def decoded_body(case: Case) -> bytes:
    reply = build_reply(case)
    decoder = make_decoder(reply.headers.get("content-encoding"))
    return decoder.feed(b"".join(reply.chunks)) + decoder.flush()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def summary(result: MeterResult | None) -> Any:
    if result is None:
        return None
    return (result.model, result.units.to_dict(), result.usage_reported, result.estimate_reason)


@PROPERTY_SETTINGS
@given(case=st.sampled_from(HTTP_CASES), cuts=st.lists(st.integers(0, 2**31), max_size=40))
def test_any_split_same_usage(case: Case, cuts: list[int]) -> None:
    body = decoded_body(case)

    assert summary(parse(case, body, cuts)) == summary(parse(case, body, []))


@PROPERTY_SETTINGS
@given(
    case=st.sampled_from(HTTP_CASES),
    data=st.data(),
    garbage=st.binary(max_size=4096),
    cuts=st.lists(st.integers(0, 2**31), max_size=20),
)
def test_malformed_bodies_never_raise(
    case: Case, data: st.DataObject, garbage: bytes, cuts: list[int]
) -> None:
    body = decoded_body(case)
    keep = data.draw(st.integers(0, len(body)), label="truncate at")
    mangled = body[:keep] + garbage

    result = parse(case, mangled, cuts)

    if result is not None:
        assert all(value >= 0 for value in result.units.to_dict().values())


@PROPERTY_SETTINGS
@given(case=st.sampled_from(HTTP_CASES), cuts=st.lists(st.integers(0, 2**31), max_size=40))
def test_tap_passes_bytes_unchanged(case: Case, cuts: list[int]) -> None:
    reply = build_reply(case)
    wire = b"".join(reply.chunks)
    url = case_url(case)
    host = url.hostname or ""
    provider = provider_for_host(host)
    assert provider is not None
    exchange = build_exchange(case)
    route = provider.match(host, exchange.method, exchange.path)
    if route is None or route.free:
        return
    request = provider.read_request(route, exchange.request_body, exchange.request_headers)
    parser = provider.response_parser(route, request, reply.headers)
    tap = ResponseTap("[test]", make_decoder(reply.headers.get("content-encoding")), parser, None)

    sent = [piece for chunk in split_at(wire, cuts) for piece in tap(chunk)] + list(tap(b""))

    assert b"".join(sent) == wire
    assert all(sent)  # an empty chunk would end an HTTP/1 chunked body early

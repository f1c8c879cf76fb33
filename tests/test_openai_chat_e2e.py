"""OpenAI chat completions through a real costtap, from the official SDK, to a fake upstream.

The SDK is configured by environment alone (HTTPS_PROXY, SSL_CERT_FILE). Expected units
and models come from the recorded cases' `.expected.json` files and the recorded bodies.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
import pytest

from tests.support.corpus import Case, cases
from tests.support.costtap_process import CosttapProcess, LedgerProbe
from tests.support.fake_upstream import FakeUpstream
from tests.support.openai_fake import chat_reply, split_sse_events
from tests.support.published_prices import HAND_COSTS

pytestmark = pytest.mark.e2e

CHAT_CASES = cases("openai", "chat-")
REPORTED_CASES = [case for case in CHAT_CASES if case.expected["usage_reported"]]
STREAM_CASES_WITH_USAGE = [case for case in REPORTED_CASES if case.has(".response.sse")]
NO_USAGE_CASE = Case("openai", "chat-stream-no-usage-gpt4")

# What OpenAI reports for the recorded no-usage stream once usage is asked for. Its sister
# recording, chat-stream-usage-gpt4, sends the same prompt to the same model: 12 prompt
# tokens. The completion "This is a test." is 5 tokens: "This", " is", " a", " test", ".".
NO_USAGE_CASE_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


def expected_model(case: Case) -> str:
    """The model the provider reported: from `.expected.json`, else the response body."""
    if "model" in case.expected:
        return str(case.expected["model"])
    return str(json.loads(case.response_body())["model"])


def stream_without_usage(body: bytes) -> bytes:
    """What OpenAI sends a client that did not ask for usage: no usage chunk, no usage member."""
    content_events = [event for event in split_sse_events(body) if b'"choices":[]' not in event]
    return b"".join(content_events).replace(b',"usage":null', b"")


def call_sync(request: dict[str, Any]) -> None:
    client = openai.OpenAI(max_retries=0)
    if request.get("stream"):
        for _ in client.chat.completions.create(**request):
            pass
    else:
        client.chat.completions.create(**request)


def raw_stream_bytes(request: dict[str, Any]) -> bytes:
    client = openai.OpenAI(max_retries=0)
    with client.chat.completions.with_streaming_response.create(**request) as response:
        return b"".join(response.iter_bytes())


@pytest.mark.parametrize("case", REPORTED_CASES, ids=lambda case: case.name)
def test_chat_case_recorded_exactly(
    case: Case, client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    fake_openai.responder = lambda received: chat_reply(case, received)
    before = ledger.request_ids()

    call_sync(case.request_body)

    [row] = ledger.wait_for_new(before)
    assert row["units"] == case.expected["units"]
    assert row["model"] == expected_model(case)
    assert row["estimated"] == 0
    assert row["status"] == "success"
    assert row["provider"] == "openai"
    assert row["endpoint"] == "chat.completions"
    assert row["cost_usd"] == pytest.approx(HAND_COSTS[case.id][0], rel=1e-9)
    [received] = fake_openai.received
    assert received.path == "/v1/chat/completions"


def test_no_usage_stream_exact_after_injection(
    client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    case = NO_USAGE_CASE
    fake_openai.responder = lambda received: chat_reply(
        case, received, usage_if_requested=NO_USAGE_CASE_USAGE
    )
    before = ledger.request_ids()

    client_bytes = raw_stream_bytes(case.request_body)

    [received] = fake_openai.received
    assert json.loads(received.body)["stream_options"] == {"include_usage": True}
    assert client_bytes == case.read(".response.sse")
    [row] = ledger.wait_for_new(before)
    assert row["units"] == {"input_tokens": 12, "output_tokens": 5}
    assert row["model"] == "gpt-4-0613"
    assert row["estimated"] == 0


@pytest.mark.parametrize("case", STREAM_CASES_WITH_USAGE, ids=lambda case: case.name)
def test_client_without_usage_gets_stream_unchanged(
    case: Case, client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    fake_openai.responder = lambda received: chat_reply(case, received)
    request = {key: value for key, value in case.request_body.items() if key != "stream_options"}
    before = ledger.request_ids()

    client_bytes = raw_stream_bytes(request)

    assert client_bytes == stream_without_usage(case.read(".response.sse"))
    assert b'"usage"' not in client_bytes
    [row] = ledger.wait_for_new(before)
    assert row["units"] == case.expected["units"]
    assert row["estimated"] == 0


def test_stream_without_usage_is_marked_estimate(
    client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    # This upstream ignores include_usage, so no usage ever arrives.
    fake_openai.responder = lambda received: chat_reply(NO_USAGE_CASE, received)
    before = ledger.request_ids()

    client_bytes = raw_stream_bytes(NO_USAGE_CASE.request_body)

    assert client_bytes == NO_USAGE_CASE.read(".response.sse")
    [row] = ledger.wait_for_new(before)
    assert row["estimated"] == 1
    # Estimates count 4 characters a token, rounded up: the prompt "Say this is a test" has
    # 18 characters (5 tokens), plus 4 for its message and 3 for the reply: 12. The streamed
    # text "This is a test." has 15 characters (4 tokens).
    assert row["units"] == {"input_tokens": 12, "output_tokens": 4}
    assert row["estimate_reason"] == "stream ended without a usage chunk"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_body_decoded_for_parsing(
    encoding: str, client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    case = Case("openai", "chat-nonstream-gpt4o-basic")
    fake_openai.responder = lambda received: chat_reply(case, received, encoding=encoding)
    before = ledger.request_ids()

    completion = openai.OpenAI(max_retries=0).chat.completions.create(**case.request_body)

    assert completion.choices[0].message.content == "The capital of France is Paris."
    [row] = ledger.wait_for_new(before)
    assert row["units"] == {"input_tokens": 24, "output_tokens": 8}


def test_async_client_stream_and_body(
    client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    stream_case = Case("openai", "chat-stream-usage-toolcall")
    body_case = Case("openai", "chat-nonstream-o3mini-reasoning")

    async def make_calls() -> list[str]:
        client = openai.AsyncOpenAI(max_retries=0)
        fake_openai.responder = lambda received: chat_reply(stream_case, received)
        names: list[str] = []
        async for chunk in await client.chat.completions.create(**stream_case.request_body):
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    if call.function and call.function.name:
                        names.append(call.function.name)
        fake_openai.responder = lambda received: chat_reply(body_case, received)
        await client.chat.completions.create(**body_case.request_body)
        await client.close()
        return names

    before = ledger.request_ids()
    tool_names = asyncio.run(make_calls())

    assert tool_names == ["get_capital"]
    rows = ledger.wait_for_new(before, count=2)
    units_by_model = {row["model"]: row["units"] for row in rows}
    assert units_by_model == {
        "gpt-4o-mini-2024-07-18": {"input_tokens": 53, "output_tokens": 15},
        "o3-mini-2025-01-31": {"input_tokens": 7, "output_tokens": 87, "reasoning_tokens": 64},
    }


def test_stream_reaches_client_before_upstream_finishes(
    client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    case = Case("openai", "chat-stream-usage-gpt4")
    fake_openai.responder = lambda received: chat_reply(case, received, pause_after_first=1.0)
    before = ledger.request_ids()
    first_chunk_at = None

    for _ in openai.OpenAI(max_retries=0).chat.completions.create(**case.request_body):
        if first_chunk_at is None:
            first_chunk_at = time.monotonic()

    [second_chunk_sent_at] = fake_openai.second_chunk_times
    assert first_chunk_at is not None
    assert first_chunk_at < second_chunk_sent_at
    [row] = ledger.wait_for_new(before)
    assert row["units"] == {"input_tokens": 12, "output_tokens": 5}


def test_upstream_error_recorded_without_units(
    client_env: CosttapProcess, fake_openai: FakeUpstream, ledger: LedgerProbe
) -> None:
    from tests.support.fake_upstream import Reply

    error_body = b'{"error": {"message": "Invalid model", "type": "invalid_request_error"}}'
    fake_openai.responder = lambda received: Reply(
        [error_body], status=400, headers={"content-type": "application/json"}
    )
    before = ledger.request_ids()

    with pytest.raises(openai.BadRequestError, match="Invalid model"):
        openai.OpenAI(max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )

    [row] = ledger.wait_for_new(before)
    assert row["status"] == "error"
    assert row["http_status"] == 400
    assert row["units"] == {}
    assert row["estimated"] == 0

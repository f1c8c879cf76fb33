"""The OpenAI provider module on its own: requests, bodies, streams and the usage remover."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costtap.providers.base import RequestInfo, Route, Units
from costtap.providers.openai import (
    ChatBodyParser,
    ChatStreamParser,
    OpenAIProvider,
    UsageChunkRemover,
    read_chat_request,
)
from tests.support.corpus import Case, cases
from tests.support.openai_fake import split_sse_events

PROVIDER = OpenAIProvider()
CHAT = Route("openai", "chat.completions")
REPORTED_CHAT_CASES = [case for case in cases("openai", "chat-") if case.expected["usage_reported"]]
STREAM_CASES = [case for case in cases("openai", "chat-stream-")]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def parse(case: Case, chunks: list[bytes] | None = None) -> tuple[str | None, Units, bool]:
    request = read_chat_request(case.read(".request.json"))
    content_type = "text/event-stream" if case.has(".response.sse") else "application/json"
    parser = PROVIDER.response_parser(CHAT, request, {"content-type": content_type})
    for chunk in chunks if chunks is not None else [case.response_body()]:
        parser.feed(chunk)
    result = parser.finish()
    return result.model, result.units, result.usage_reported


@pytest.mark.parametrize(
    ("host", "method", "path", "expected"),
    [
        ("api.openai.com", "POST", "/v1/chat/completions", Route("openai", "chat.completions")),
        ("api.openai.com", "POST", "/v1/chat/completions?x=1", Route("openai", "chat.completions")),
        ("api.openai.com", "POST", "/v1/responses", Route("openai", "responses")),
        ("api.openai.com", "POST", "/v1/embeddings", Route("openai", "embeddings")),
        ("api.openai.com", "POST", "/v1/completions", Route("openai", "completions")),
        ("api.openai.com", "POST", "/v1/audio/speech", Route("openai", "audio.speech")),
        (
            "api.openai.com",
            "POST",
            "/v1/audio/transcriptions",
            Route("openai", "audio.transcriptions"),
        ),
        ("api.openai.com", "POST", "/v1/audio/translations", Route("openai", "audio.translations")),
        ("api.openai.com", "POST", "/v1/images/generations", Route("openai", "images")),
        ("api.openai.com", "POST", "/v1/images/edits", Route("openai", "images")),
        # Free calls pass through without spend.
        ("api.openai.com", "GET", "/v1/chat/completions", Route("openai", "chat", free=True)),
        ("api.openai.com", "GET", "/v1/models", Route("openai", "models", free=True)),
        ("api.openai.com", "POST", "/v1/moderations", Route("openai", "moderations", free=True)),
        ("api.openai.com", "POST", "/v1/batches", Route("openai", "batches", free=True)),
        ("api.openai.com", "POST", "/v1/files", Route("openai", "files", free=True)),
        (
            "api.openai.com",
            "POST",
            "/v1/responses/input_tokens",
            Route("openai", "responses", free=True),
        ),
        # Azure OpenAI: the deployment in the path is the model until the response names one.
        (
            "res.openai.azure.com",
            "POST",
            "/openai/deployments/my-gpt/chat/completions?api-version=2024-02-01",
            Route("azure-openai", "chat.completions", path_model="my-gpt"),
        ),
        (
            "res.openai.azure.com",
            "POST",
            "/openai/v1/responses",
            Route("azure-openai", "responses"),
        ),
        ("api.openai.com", "POST", "/v1/chat/completions/abc/messages", None),
        ("api.openai.com", "POST", "/v2/chat/completions", None),
        ("api.openai.com", "POST", "/v1/something-new", None),
    ],
)
def test_match(host: str, method: str, path: str, expected: Route | None) -> None:
    assert PROVIDER.match(host, method, path) == expected


@pytest.mark.parametrize("case", REPORTED_CHAT_CASES, ids=lambda case: case.name)
def test_corpus_units_exact(case: Case) -> None:
    model, units, reported = parse(case)

    assert units.to_dict() == case.expected["units"]
    assert reported is True
    if "model" in case.expected:
        assert model == case.expected["model"]


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(REPORTED_CHAT_CASES[:4] + STREAM_CASES),
    cuts=st.lists(st.integers(0, 10**6), max_size=30),
)
def test_any_split_gives_same_usage(case: Case, cuts: list[int]) -> None:
    body = case.response_body()

    assert parse(case, split_at(body, cuts)) == parse(case)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), streaming=st.booleans())
def test_garbage_never_raises(data: bytes, streaming: bool) -> None:
    request = RequestInfo(model="gpt-4o", estimate=Units(input_tokens=3, output_tokens=10))
    parser = ChatStreamParser(request) if streaming else ChatBodyParser(request)
    parser.feed(data)

    result = parser.finish()

    assert result.model == "gpt-4o"


def test_truncated_stream_estimates_from_seen_text() -> None:
    case = Case("openai", "chat-stream-usage-gpt4")
    body = case.read(".response.sse")
    cut = body.index(b'"content":" a"')
    request = read_chat_request(case.read(".request.json"))
    parser = ChatStreamParser(request)
    parser.feed(body[:cut])

    result = parser.finish()

    assert result.usage_reported is False
    assert result.estimate_reason == "stream cut short"
    # Seen text: "" + "\"This" + " is" = 8 characters, 2 tokens at 4 characters a token.
    # Input: the request's estimate, 5 tokens of text plus 4 for the message and 3 for the reply.
    assert result.units == Units(input_tokens=12, output_tokens=2)
    assert result.model == "gpt-4-0613"


def test_request_injects_stream_usage() -> None:
    body = (
        b'{"model":"gpt-4","stream":true,'
        b'"stream_options":{"include_obfuscation":false},"messages":[]}'
    )

    info = read_chat_request(body)

    assert info.hide_usage_from_client is True
    assert info.upstream_body is not None
    sent = json.loads(info.upstream_body)
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert sent["model"] == "gpt-4"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
        b'{"model":"gpt-4","stream":false,"messages":[]}',
        b'{"model":"gpt-4","messages":[]}',
        b"not json",
        b"[1, 2]",
    ],
)
def test_request_left_unchanged(body: bytes) -> None:
    info = read_chat_request(body)

    assert info.upstream_body is None
    assert info.hide_usage_from_client is False


def test_request_estimate() -> None:
    body = json.dumps(
        {
            "model": "gpt-4o",
            "max_completion_tokens": 50,
            "messages": [
                {"role": "system", "content": "12345678"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "abcd"},
                        {"type": "image_url", "image_url": {"url": "data:x"}},
                    ],
                },
            ],
        }
    ).encode()

    info = read_chat_request(body)

    # 8 + 4 characters of text: 3 tokens; the image URL is not text. Two messages add
    # 4 tokens each, and the reply 3: 3 + 8 + 3 = 14.
    assert info.estimate == Units(input_tokens=14, output_tokens=50)
    assert info.model == "gpt-4o"


@pytest.mark.parametrize(
    "case",
    [Case("openai", "chat-stream-usage-gpt4"), Case("openai", "chat-stream-usage-toolcall")],
    ids=lambda case: case.name,
)
def test_usage_remover_restores_plain_stream(case: Case) -> None:
    body = case.read(".response.sse")
    remover = UsageChunkRemover()

    output = b"".join(remover.feed(event) for event in split_sse_events(body)) + remover.finish()

    expected = b"".join(event for event in split_sse_events(body) if b'"choices":[]' not in event)
    assert output == expected.replace(b',"usage":null', b"")


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 10**5), max_size=40))
def test_usage_remover_any_split(cuts: list[int]) -> None:
    body = Case("openai", "chat-stream-usage-toolcall").read(".response.sse")
    whole = UsageChunkRemover()
    expected = whole.feed(body) + whole.finish()
    remover = UsageChunkRemover()

    output = b"".join(remover.feed(chunk) for chunk in split_at(body, cuts)) + remover.finish()

    assert output == expected


def test_usage_remover_keeps_usage_member_first() -> None:
    remover = UsageChunkRemover()

    output = remover.feed(
        b'data: {"usage":null,"id":"x",'
        b'"choices":[{"delta":{"content":"\\"usage\\":null"}}]}\r\n\r\n'
    )

    assert (
        output == b'data: {"id":"x","choices":[{"delta":{"content":"\\"usage\\":null"}}]}\r\n\r\n'
    )

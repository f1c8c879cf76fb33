"""Replies of the fake OpenAI upstream, built from recorded chat completions."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import brotli

from tests.support.corpus import Case
from tests.support.fake_upstream import ReceivedRequest, Reply


def split_sse_events(body: bytes) -> list[bytes]:
    """Split an SSE body into events, each keeping its closing blank line."""
    events = []
    rest = body
    while rest:
        end = rest.find(b"\n\n")
        if end < 0:
            events.append(rest)
            break
        events.append(rest[: end + 2])
        rest = rest[end + 2 :]
    return events


def requests_usage(received: ReceivedRequest) -> bool:
    options = json.loads(received.body).get("stream_options") or {}
    return options.get("include_usage") is True


def add_stream_usage(body: bytes, usage: dict[str, Any]) -> bytes:
    """Turn a recorded stream without usage into what OpenAI sends with include_usage.

    Every chunk gains `"usage":null` as its last member, and a chunk with no choices and
    the usage comes before `data: [DONE]`.
    """
    output = []
    last_chunk: dict[str, Any] = {}
    for event in split_sse_events(body):
        payload = event.removeprefix(b"data: ").rstrip(b"\n")
        if payload == b"[DONE]":
            usage_chunk = {
                "id": last_chunk["id"],
                "object": "chat.completion.chunk",
                "created": last_chunk["created"],
                "model": last_chunk["model"],
                "system_fingerprint": last_chunk.get("system_fingerprint"),
                "choices": [],
                "usage": usage,
            }
            output.append(
                b"data: " + json.dumps(usage_chunk, separators=(",", ":")).encode() + b"\n\n"
            )
            output.append(event)
            continue
        last_chunk = json.loads(payload)
        assert payload.endswith(b"}")
        output.append(b"data: " + payload[:-1] + b',"usage":null}\n\n')
    return b"".join(output)


def chat_reply(
    case: Case,
    received: ReceivedRequest,
    *,
    usage_if_requested: dict[str, Any] | None = None,
    encoding: str | None = None,
    pause_after_first: float = 0.0,
) -> Reply:
    """Reply to a chat completions request with a recorded response.

    A stream is sent one event per chunk. `usage_if_requested` is added to a stream recorded
    without usage when the request sets `stream_options.include_usage`, as OpenAI does.
    `encoding` compresses a JSON body. A case recorded with Content-Encoding gzip is sent
    with its own wire bytes.
    """
    if case.has(".response.sse"):
        body = case.read(".response.sse")
        if usage_if_requested is not None and requests_usage(received):
            body = add_stream_usage(body, usage_if_requested)
        headers = {"content-type": "text/event-stream; charset=utf-8"}
        return Reply(split_sse_events(body), headers=headers, pause_after_first=pause_after_first)

    headers = {"content-type": "application/json"}
    wire = case.wire_gzip()
    if wire is not None:
        headers["content-encoding"] = "gzip"
        return Reply([wire], headers=headers)
    body = case.response_body()
    if encoding is not None:
        headers["content-encoding"] = encoding
        body = compress(body, encoding)
    # Several chunks, so that parsers see a JSON body split at arbitrary points.
    size = max(1, len(body) // 3)
    return Reply(
        [body[index : index + size] for index in range(0, len(body), size)], headers=headers
    )


def compress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    if encoding == "br":
        return bytes(brotli.compress(body))
    raise ValueError(f"unknown encoding {encoding}")


# A small chat call with an output cap. Preflight estimates it at 17 input tokens ("x" * 40
# is 10 tokens of text, plus 4 for the message and 3 for the reply) and its cap of 20 output
# tokens. At the gpt-4o list price ($2.50 and $10 per million tokens) that is $0.0002425.
CAPPED_CHAT: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "x" * 40}],
    "max_tokens": 20,
}
CAPPED_CHAT_ESTIMATE = {"input_tokens": 17, "output_tokens": 20}
CAPPED_CHAT_COST_USD = 17 * 2.50 / 1_000_000 + 20 * 10.00 / 1_000_000


def usage_completion(model: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """Return a non-streamed chat completion body that reports the given usage."""
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return json.dumps(body).encode()


def json_reply(body: bytes, pause_after_first: float = 0.0) -> Reply:
    """Reply with a JSON body. With a pause, its first byte goes at once and the rest after it."""
    chunks = [body[:1], body[1:]] if pause_after_first else [body]
    return Reply(
        chunks, headers={"content-type": "application/json"}, pause_after_first=pause_after_first
    )

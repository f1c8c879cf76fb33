"""The SSE splitter and the content decoders, fed at arbitrary chunk boundaries."""

from __future__ import annotations

import gzip
import itertools
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costtap.providers.decoding import DecodingError, make_decoder
from costtap.providers.sse import SseEvent, SseSplitter


def split_events(chunks: list[bytes]) -> list[SseEvent]:
    splitter = SseSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    return events + splitter.finish()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_line_endings(newline: bytes) -> None:
    body = newline.join(
        [b"event: a", b"data: 1", b"data:2", b"", b": comment", b"data: x", b"", b""]
    )

    events = split_events([body[:i] for i in range(0)] + [bytes([byte]) for byte in body])

    assert events == [SseEvent("a", "1\n2"), SseEvent("", "x")]


def test_sse_last_event_without_blank_line() -> None:
    assert split_events([b"data: a\n\ndata: b"]) == [SseEvent("", "a"), SseEvent("", "b")]


def test_sse_crlf_split_between_chunks() -> None:
    assert split_events([b"data: a\r", b"\n\r", b"\n"]) == [SseEvent("", "a")]


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=20))
def test_sse_any_split(cuts: list[int]) -> None:
    body = b'event: e\r\ndata: {"a": 1}\r\n\r\ndata: [DONE]\n\n'
    points = sorted({0, len(body), *(cut % (len(body) + 1) for cut in cuts)})
    chunks = [body[start:end] for start, end in itertools.pairwise(points)]

    assert split_events(chunks) == [SseEvent("e", '{"a": 1}'), SseEvent("", "[DONE]")]


BODY = b'{"usage": {"prompt_tokens": 1}}' * 200


@pytest.mark.parametrize(
    ("encoding", "encoded"),
    [
        ("gzip", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("gzip", gzip.compress(BODY[:100]) + gzip.compress(BODY[100:])),  # two gzip members
        ("deflate", zlib.compress(BODY)),
        ("deflate", zlib.compress(BODY)[2:-4]),  # raw deflate, as some servers send it
        ("br", brotli.compress(BODY)),
        ("identity", BODY),
        (None, BODY),
    ],
)
def test_decoder_byte_by_byte(encoding: str | None, encoded: bytes) -> None:
    decoder = make_decoder(encoding)

    decoded = (
        b"".join(decoder.feed(encoded[i : i + 1]) for i in range(len(encoded))) + decoder.flush()
    )

    assert decoded == BODY


def test_decoder_rejects_unknown_encoding() -> None:
    with pytest.raises(DecodingError, match="unsupported content encoding 'zstd'"):
        make_decoder("zstd")


def test_decoder_raises_on_corrupt_gzip() -> None:
    decoder = make_decoder("gzip")

    with pytest.raises(DecodingError):
        decoder.feed(b"\x1f\x8b\x08\x00garbage that is not deflate data")

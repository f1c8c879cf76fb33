"""Every recorded HTTP case, replayed through a real costtap from a fake upstream.

The fake plays the provider: it replies with the recorded body (the exact gzip wire bytes
where the recording has them) and headers. The client is a plain HTTPS client that
tunnels through costtap with CONNECT, as any service's HTTP library does with HTTPS_PROXY.
Each case must yield exactly its `.expected.json`.
"""

from __future__ import annotations

import gzip
import http.client
import json
import ssl
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.clients import metric_value
from tests.support.corpus import Case, all_cases
from tests.support.costtap_process import (
    CosttapProcess,
    LedgerProbe,
    start_costtap,
    write_trust_bundle,
)
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.openai_fake import split_sse_events
from tests.support.pki import TestAuthority
from tests.support.published_prices import HAND_COSTS

pytestmark = pytest.mark.e2e

AZURE_RESOURCE_HOST = "myresource.openai.azure.com"

# Every HTTP case; WebSocket transcripts are replayed by their own tests.
HTTP_CASES = [case for case in all_cases() if not case.has(".frames.jsonl")]


def case_url(case: Case) -> urllib.parse.SplitResult:
    url = (
        case.meta["url"]
        .split(" ", 1)[0]
        .replace("{resource}.openai.azure.com", AZURE_RESOURCE_HOST)
    )
    return urllib.parse.urlsplit(url)


def multipart(fields: dict[str, str], file_name: str) -> tuple[str, bytes]:
    boundary = "costtap-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
        "Content-Type: audio/mpeg\r\n\r\n".encode()
        + b"ID3 not really audio\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def json_body(payload: dict[str, object]) -> tuple[str, bytes]:
    return "application/json", json.dumps(payload).encode()


# Requests for cases recorded without their request body: what the client would have sent.
SYNTHETIC_REQUESTS: dict[str, tuple[str, bytes]] = {
    "openai/completions-legacy-nonstream": json_body(
        {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 16}
    ),
    "openai/images-dalle3-no-usage": json_body(
        {"model": "dall-e-3", "prompt": "A baby sea otter", "n": 2, "response_format": "b64_json"}
    ),
    "openai/transcription-whisper1-verbose": multipart(
        {"model": "whisper-1", "response_format": "verbose_json"}, "speech.mp3"
    ),
    "openai-spec/images-gpt-image-1": json_body(
        {"model": "gpt-image-1", "prompt": "A cute baby sea otter"}
    ),
    "openai-spec/transcription-gpt4o-tokens": multipart(
        {"model": "gpt-4o-transcribe"}, "speech.mp3"
    ),
    "openai-spec/transcription-stream-gpt4o-mini": multipart(
        {"model": "gpt-4o-mini-transcribe", "stream": "true"}, "speech.mp3"
    ),
    "openai-spec/batch-create": json_body(
        {
            "input_file_id": "file-abc123",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
    ),
    "openai-spec/moderations-omni": json_body(
        {"model": "omni-moderation-latest", "input": "I want to kill them."}
    ),
    "azure-openai/responses-stream-azure-text-chunks": json_body(
        {"model": "gpt-5.1", "input": "Hello", "stream": True}
    ),
    "elevenlabs/stt-scribe-live-with-duration": multipart({"model_id": "scribe_v1"}, "speech.mp3"),
    # The recording kept only the response headers; its text had 12 characters.
    "elevenlabs/tts-eleven_v3-live": json_body({"text": "Hello there!", "model_id": "eleven_v3"}),
}

# Response bodies for cases recorded without one. OpenAI's API reference gives the final
# event of a speech stream as `speech.audio.done` with token usage.
SPEECH_DONE_EVENT = (
    b'data: {"type":"speech.audio.done","usage":'
    b'{"input_tokens":14,"output_tokens":101,"total_tokens":115}}\n\n'
)
AUDIO_BYTES = b"ID3 fake mp3 frames"


@dataclass
class Exchange:
    method: str
    path: str
    request_headers: dict[str, str]
    request_body: bytes
    reply: Reply


def recorded_headers(case: Case) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, values in case.meta.get("response_headers", {}).items():
        if name.lower() not in ("transfer-encoding", "content-length", "content-encoding"):
            headers[name] = values[0] if isinstance(values, list) else values
    if case.has(".headers.txt"):
        for line in case.read(".headers.txt").decode().splitlines():
            name, _, value = line.partition(": ")
            if name.lower() in ("content-type", "character-cost"):
                headers[name] = value
    return headers


def build_reply(case: Case) -> Reply:
    headers = recorded_headers(case)
    status = int(case.meta.get("status") or 200)
    if wire := case.wire_gzip():
        headers["content-encoding"] = "gzip"
        # Split the compressed bytes, so that the decoder gets arbitrary boundaries.
        third = max(1, len(wire) // 3)
        return Reply([wire[i : i + third] for i in range(0, len(wire), third)], status, headers)
    if case.id == "openai-spec/audio-speech-sse":
        return Reply([SPEECH_DONE_EVENT], status, {"content-type": "text/event-stream"})
    if case.has(".response.jsonl"):
        # The recorder kept one event payload per line; the wire had SSE framing.
        lines = [line for line in case.read(".response.jsonl").splitlines() if line.strip()]
        return Reply(
            [b"data: " + line + b"\n\n" for line in lines],
            status,
            {"content-type": "text/event-stream"},
        )
    if case.has(".response.sse"):
        headers.setdefault("content-type", "text/event-stream")
        return Reply(split_sse_events(case.read(".response.sse")), status, headers)
    try:
        body = case.response_body()
    except FileNotFoundError:
        if case.provider_dir == "gcp-tts":
            return Reply(
                [b'{"audioContent": "SUQz"}'], status, {"content-type": "application/json"}
            )
        headers.setdefault("content-type", "audio/mpeg")
        return Reply([AUDIO_BYTES], status, headers)
    headers.setdefault("content-type", "application/json")
    third = max(1, len(body) // 3)
    return Reply([body[i : i + third] for i in range(0, len(body), third)], status, headers)


def build_exchange(case: Case) -> Exchange:
    url = case_url(case)
    path = url.path + (f"?{url.query}" if url.query else "")
    if case.id in SYNTHETIC_REQUESTS:
        content_type, body = SYNTHETIC_REQUESTS[case.id]
    elif case.has(".request.json"):
        content_type, body = "application/json", case.read(".request.json")
    else:
        raise AssertionError(f"{case.id}: no request body recorded and none synthesized")
    return Exchange(
        case.meta.get("method", "POST"),
        path,
        {"content-type": content_type},
        body,
        build_reply(case),
    )


def corpus_hosts() -> list[str]:
    """Return every recorded host, each to be routed to the fake.

    costtap rejects an `--upstream` for a host no provider claims at start, so a case
    whose host is not metered fails here instead of reaching the real host.
    """
    return sorted({case_url(case).hostname or "" for case in HTTP_CASES})


@pytest.fixture(scope="module")
def corpus_costtap(
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> Iterator[CosttapProcess]:
    data_dir = tmp_path_factory.mktemp("corpus") / "data"
    process = start_costtap(
        data_dir, fake_openai_server.url, test_authority.cert_path, corpus_hosts()
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def corpus_trust(corpus_costtap: CosttapProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(write_trust_bundle(corpus_costtap)))


def send_through_proxy(
    proxy: CosttapProcess, context: ssl.SSLContext, host: str, exchange: Exchange
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context, timeout=30)
    connection.set_tunnel(host, 443)
    try:
        connection.request(
            exchange.method,
            exchange.path,
            body=exchange.request_body,
            headers=exchange.request_headers,
        )
        response = connection.getresponse()
        return (
            response.status,
            {name.lower(): value for name, value in response.getheaders()},
            response.read(),
        )
    finally:
        connection.close()


@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda case: case.id)
def test_case_yields_expected(
    case: Case,
    corpus_costtap: CosttapProcess,
    corpus_trust: ssl.SSLContext,
    fake_openai_server: FakeUpstream,
) -> None:
    exchange = build_exchange(case)
    fake_openai_server.received.clear()
    fake_openai_server.responder = lambda received: exchange.reply
    ledger = LedgerProbe(corpus_costtap.data_dir)
    expected = case.expected
    host = case_url(case).hostname or ""
    before = ledger.request_ids()

    status, headers, body = send_through_proxy(corpus_costtap, corpus_trust, host, exchange)

    # What the client receives is what the upstream sent.
    assert status == exchange.reply.status
    wire_body = b"".join(exchange.reply.chunks)
    assert body == wire_body
    assert headers.get("content-encoding") == exchange.reply.headers.get("content-encoding")
    [received] = fake_openai_server.received
    if case.id == "openai/chat-stream-no-usage-gpt4":
        # costtap asked for the usage the client did not ask for; nothing else changed.
        sent = json.loads(received.body)
        assert sent.pop("stream_options") == {"include_usage": True}
        assert sent == json.loads(exchange.request_body)
    else:
        assert received.body == exchange.request_body

    if expected.get("billable") is False:
        assert ledger.request_ids() == before
        return
    [row] = ledger.wait_for_new(before)
    if expected["usage_reported"]:
        assert row["units"] == expected["units"]
        assert row["estimated"] == 0
    else:
        assert row["estimated"] == 1
        assert row["units"]  # an estimate, never zero
    if "model" in expected:
        assert row["model"] == expected["model"]
    assert row["status"] == "success"
    if case.id in HAND_COSTS:
        assert row["cost_usd"] == pytest.approx(HAND_COSTS[case.id][0], rel=1e-9)
    elif expected["usage_reported"]:
        # A priced-looking call that has no hand calculation must be unpriced, never zero.
        assert row["cost_usd"] is None, f"{case.id} is priced but has no hand calculation"


def test_free_calls_counted(
    corpus_costtap: CosttapProcess, corpus_trust: ssl.SSLContext, fake_openai_server: FakeUpstream
) -> None:
    case = Case("openai-spec", "moderations-omni")
    exchange = build_exchange(case)
    fake_openai_server.responder = lambda received: exchange.reply
    labels = 'endpoint="moderations",provider="openai"'
    before = metric_value(corpus_costtap, f"costtap_free_calls_total{{{labels}}}")

    send_through_proxy(corpus_costtap, corpus_trust, "api.openai.com", exchange)

    assert metric_value(corpus_costtap, f"costtap_free_calls_total{{{labels}}}") == before + 1


def test_gzip_case_decoded_only_for_parsing(
    corpus_costtap: CosttapProcess, corpus_trust: ssl.SSLContext
) -> None:
    case = Case("anthropic", "messages-stream-gzip-thinking")

    reply = build_reply(case)

    # The test sends the recorded wire bytes, which decode to the recorded stream.
    assert gzip.decompress(b"".join(reply.chunks)) == case.read(".response.sse")


def test_unknown_path_passes_unmetered(
    corpus_costtap: CosttapProcess, corpus_trust: ssl.SSLContext, fake_openai_server: FakeUpstream
) -> None:
    reply = Reply([b'{"ok": true}'], headers={"content-type": "application/json"})
    fake_openai_server.responder = lambda received: reply
    fake_openai_server.received.clear()
    exchange = Exchange(
        "POST", "/v1/some-future-endpoint", {"content-type": "application/json"}, b"{}", reply
    )
    ledger = LedgerProbe(corpus_costtap.data_dir)
    before = ledger.request_ids()

    status, _, body = send_through_proxy(corpus_costtap, corpus_trust, "api.openai.com", exchange)

    assert status == 200
    assert body == b'{"ok": true}'
    assert [received.path for received in fake_openai_server.received] == [
        "/v1/some-future-endpoint"
    ]
    assert ledger.request_ids() == before

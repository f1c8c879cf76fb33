"""The official google-genai and elevenlabs SDKs through costtap, configured by environment.

Each SDK only gets HTTPS_PROXY, SSL_CERT_FILE and its API key variable, as a service would.
The fake upstream replies with recorded responses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import route_clients_through
from tests.support.corpus import Case
from tests.support.costtap_process import (
    CosttapProcess,
    LedgerProbe,
    start_costtap,
    write_trust_bundle,
)
from tests.support.fake_upstream import FakeUpstream, ReceivedRequest, Reply
from tests.support.openai_fake import split_sse_events
from tests.support.pki import TestAuthority

pytestmark = pytest.mark.e2e

SDK_HOSTS = ("generativelanguage.googleapis.com", "api.elevenlabs.io")
AUDIO_BYTES = b"ID3 fake mp3 frames " * 50


@pytest.fixture(scope="module")
def sdk_costtap(
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> Iterator[tuple[CosttapProcess, Path]]:
    data_dir = tmp_path_factory.mktemp("sdks") / "data"
    process = start_costtap(data_dir, fake_openai_server.url, test_authority.cert_path, SDK_HOSTS)
    try:
        bundle = write_trust_bundle(process)
        yield process, bundle
    finally:
        process.stop()


@pytest.fixture
def sdk_env(
    monkeypatch: pytest.MonkeyPatch, sdk_costtap: tuple[CosttapProcess, Path]
) -> LedgerProbe:
    process, bundle = sdk_costtap
    for name in ("GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    keys = {"GOOGLE_API_KEY": "test-google-key", "ELEVENLABS_API_KEY": "test-elevenlabs-key"}
    route_clients_through(monkeypatch, process.proxy_url, bundle, keys)
    return LedgerProbe(process.data_dir)


def json_reply(case: Case) -> Reply:
    return Reply([case.response_body()], headers={"content-type": "application/json"})


def test_genai_generate_content(sdk_env: LedgerProbe, fake_openai_server: FakeUpstream) -> None:
    from google import genai

    case = Case("gemini", "generate-nonstream-thinking")
    fake_openai_server.responder = lambda received: json_reply(case)
    fake_openai_server.received.clear()
    before = sdk_env.request_ids()

    # The client is kept in a variable: google-genai closes its HTTP client when collected.
    client = genai.Client()
    response = client.models.generate_content(model="gemini-2.5-flash", contents="Hello")

    assert response.usage_metadata is not None
    [received] = fake_openai_server.received
    assert received.path.split("?", 1)[0].endswith("/models/gemini-2.5-flash:generateContent")
    [row] = sdk_env.wait_for_new(before)
    assert row["units"] == case.expected["units"]
    assert row["model"] == case.expected["model"]
    assert row["provider"] == "gemini"


def test_genai_stream(sdk_env: LedgerProbe, fake_openai_server: FakeUpstream) -> None:
    from google import genai

    case = Case("gemini", "sse-stream-thinking")
    fake_openai_server.responder = lambda received: Reply(
        split_sse_events(case.read(".response.sse")), headers={"content-type": "text/event-stream"}
    )
    before = sdk_env.request_ids()

    client = genai.Client()
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-pro", contents="Hello"))

    assert chunks
    [row] = sdk_env.wait_for_new(before)
    assert row["units"] == case.expected["units"]
    assert row["model"] == case.expected["model"]


def test_genai_async(sdk_env: LedgerProbe, fake_openai_server: FakeUpstream) -> None:
    import asyncio

    from google import genai

    case = Case("gemini", "generate-nonstream-cached")
    fake_openai_server.responder = lambda received: json_reply(case)
    before = sdk_env.request_ids()

    async def generate() -> None:
        client = genai.Client()
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="Hello")

    asyncio.run(generate())

    [row] = sdk_env.wait_for_new(before)
    assert row["units"] == case.expected["units"]


def audio_reply(received: ReceivedRequest) -> Reply:
    # ElevenLabs reports the credits charged in the character-cost header.
    return Reply(
        [AUDIO_BYTES[:500], AUDIO_BYTES[500:]],
        headers={"content-type": "audio/mpeg", "character-cost": "13"},
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["convert", "stream"])
def test_elevenlabs_text_to_speech(
    streaming: bool, sdk_env: LedgerProbe, fake_openai_server: FakeUpstream
) -> None:
    from elevenlabs.client import ElevenLabs

    case = Case("elevenlabs", "tts-convert-sdk")
    request = case.request_body
    fake_openai_server.responder = audio_reply
    fake_openai_server.received.clear()
    client = ElevenLabs()
    before = sdk_env.request_ids()

    speak = client.text_to_speech.stream if streaming else client.text_to_speech.convert
    audio = b"".join(
        speak(voice_id="test-voice-id", text=request["text"], model_id=request["model_id"])
    )

    assert audio == AUDIO_BYTES
    [received] = fake_openai_server.received
    expected_path = (
        "/v1/text-to-speech/test-voice-id/stream"
        if streaming
        else "/v1/text-to-speech/test-voice-id"
    )
    assert received.path.split("?", 1)[0] == expected_path
    [row] = sdk_env.wait_for_new(before)
    # "Hello, world!" has 13 characters; the header reported 13 credits.
    assert row["units"] == {"chars": 13, "credits": 13}
    assert row["model"] == "eleven_multilingual_v2"
    assert row["provider"] == "elevenlabs"


def test_elevenlabs_speech_to_text(sdk_env: LedgerProbe, fake_openai_server: FakeUpstream) -> None:
    from elevenlabs.client import ElevenLabs

    case = Case("elevenlabs", "stt-scribe-live-with-duration")
    fake_openai_server.responder = lambda received: json_reply(case)
    before = sdk_env.request_ids()

    transcript = ElevenLabs().speech_to_text.convert(
        file=b"ID3 not really audio", model_id="scribe_v1"
    )

    assert transcript is not None
    [row] = sdk_env.wait_for_new(before)
    assert row["units"] == case.expected["units"]
    assert row["model"] == "scribe_v1"

"""WebSocket APIs through a real costtap: recorded transcripts played by a fake upstream.

The fake sends the server's recorded frames and waits for each of the client's. The client
sends its recorded frames through costtap with aiohttp, as a service would.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support.corpus import Case
from tests.support.costtap_process import (
    CosttapProcess,
    LedgerProbe,
    start_costtap,
    write_trust_bundle,
)
from tests.support.fake_upstream import FakeUpstream
from tests.support.pki import TestAuthority
from tests.support.published_prices import HAND_COSTS

pytestmark = pytest.mark.e2e

# (case, URL the client opens, endpoint recorded)
WEBSOCKET_CASES = [
    (
        Case("openai", "realtime-ws-text-in-audio-out"),
        "wss://api.openai.com/v1/realtime?model=gpt-realtime",
        "realtime",
    ),
    (
        Case("elevenlabs", "ws-stream-input-spec-example"),
        "wss://api.elevenlabs.io/v1/text-to-speech/voice-1/stream-input?model_id=eleven_flash_v2_5",
        "text-to-speech.stream-input",
    ),
    (
        Case("gemini", "live-ws-text-in-audio-out"),
        "wss://generativelanguage.googleapis.com/ws/"
        "google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key=test",
        "live",
    ),
]


def transcript(case: Case) -> list[tuple[str, str]]:
    """Return (direction, text) pairs; direction is "client" or "server"."""
    frames = []
    for line in case.read(".frames.jsonl").decode().splitlines():
        frame = json.loads(line)
        data = frame["data"]
        text = data if isinstance(data, str) else json.dumps(data)
        frames.append(("client" if frame["direction"] == "sent" else "server", text))
    return frames


@pytest.fixture(scope="module")
def websocket_costtap(
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> Iterator[tuple[CosttapProcess, ssl.SSLContext]]:
    hosts = ["api.openai.com", "api.elevenlabs.io", "generativelanguage.googleapis.com"]
    data_dir = tmp_path_factory.mktemp("websocket") / "data"
    process = start_costtap(data_dir, fake_openai_server.url, test_authority.cert_path, hosts)
    try:
        bundle = write_trust_bundle(process)
        yield process, ssl.create_default_context(cafile=str(bundle))
    finally:
        process.stop()


async def play_client(
    url: str, proxy: str, context: ssl.SSLContext, frames: list[tuple[str, str]]
) -> list[str]:
    received: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            url, proxy=proxy, ssl=context, timeout=aiohttp.ClientWSTimeout(ws_close=10)
        ) as socket,
    ):
        for direction, text in frames:
            if direction == "client":
                await socket.send_str(text)
            else:
                message = await socket.receive(timeout=10)
                received.append(message.data)
    return received


@pytest.mark.parametrize(
    ("case", "url", "endpoint"), WEBSOCKET_CASES, ids=lambda value: getattr(value, "id", "")
)
def test_websocket_case_yields_expected(
    case: Case,
    url: str,
    endpoint: str,
    websocket_costtap: tuple[CosttapProcess, ssl.SSLContext],
    fake_openai_server: FakeUpstream,
) -> None:
    process, context = websocket_costtap
    frames = transcript(case)
    fake_openai_server.websocket_script = frames
    fake_openai_server.websocket_received.clear()
    ledger = LedgerProbe(process.data_dir)
    before = ledger.request_ids()

    received = asyncio.run(play_client(url, process.proxy_url, context, frames))

    # Both directions pass through unchanged.
    assert received == [text for direction, text in frames if direction == "server"]
    assert fake_openai_server.websocket_received == [
        text for direction, text in frames if direction == "client"
    ]
    [row] = ledger.wait_for_new(before)
    assert row["units"] == case.expected["units"]
    assert row["endpoint"] == endpoint
    assert row["estimated"] == 0
    if case.id in HAND_COSTS:
        assert row["cost_usd"] == pytest.approx(HAND_COSTS[case.id][0], rel=1e-9)
    if case.provider_dir == "gemini":
        # The model named in the client's setup message, without its "models/" prefix.
        assert row["model"] == "gemini-2.5-flash-native-audio-preview-09-2025"

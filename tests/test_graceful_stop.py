"""Stopping costtap: calls in progress finish and are recorded; new connections are refused."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.support.clients import route_clients_through
from tests.support.corpus import Case
from tests.support.costtap_process import LedgerProbe, start_costtap, write_trust_bundle
from tests.support.fake_upstream import FakeUpstream
from tests.support.openai_fake import chat_reply
from tests.support.pki import TestAuthority

pytestmark = pytest.mark.e2e


def test_sigterm_lets_open_call_finish(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    case = Case("openai", "chat-stream-usage-gpt4")
    fake_openai_server.responder = lambda received: chat_reply(
        case, received, pause_after_first=1.5
    )
    process = start_costtap(tmp_path / "data", fake_openai_server.url, test_authority.cert_path)
    route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
    first_chunk = threading.Event()
    chunks: list[object] = []

    def stream() -> None:
        for chunk in openai.OpenAI(max_retries=0).chat.completions.create(**case.request_body):
            chunks.append(chunk)
            first_chunk.set()

    client = threading.Thread(target=stream)
    client.start()
    assert first_chunk.wait(timeout=15)
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    # The listener closes at once, while the open call goes on.
    deadline = time.monotonic() + 5
    refused = False
    while not refused and time.monotonic() < deadline:
        with socket.socket() as probe:
            refused = probe.connect_ex(("127.0.0.1", process.port)) != 0
        time.sleep(0.05)
    client.join(timeout=30)
    exit_code = process.process.wait(timeout=30)

    assert refused
    assert len(chunks) == 8  # every chunk of the recorded stream, usage chunk included
    assert exit_code == 0
    [row] = LedgerProbe(process.data_dir).rows(LedgerProbe(process.data_dir).request_ids())
    assert row["units"] == {"input_tokens": 12, "output_tokens": 5}
    assert row["status"] == "success"
    assert "waiting up to 10 s for open calls" in process.log()

"""Calls that end early: at a stop (finished, denied or cut) or when a client gives up."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import openai
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


def small_completion() -> Reply:
    """Reply with a gpt-4o completion whose body ends 3 s after its first byte."""
    body = json.dumps(
        {
            "id": "chatcmpl-stop",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 17, "completion_tokens": 20, "total_tokens": 37},
        }
    ).encode()
    return Reply(
        [body[:1], body[1:]], headers={"content-type": "application/json"}, pause_after_first=3
    )


def wait_for_request(fake: FakeUpstream, already: int) -> None:
    """Wait until the fake has received a request beyond the first `already`."""
    deadline = time.monotonic() + 15
    while len(fake.received) <= already and time.monotonic() < deadline:
        time.sleep(0.05)


def capped_call(outcomes: list[object]) -> None:
    try:
        openai.OpenAI(max_retries=0, timeout=30).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x" * 40}], max_tokens=20
        )
        outcomes.append(200)
    except openai.APIStatusError as error:
        outcomes.append(error)


def test_sigterm_denies_held_call_and_records_both(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    # Each call is estimated at 17 * $2.50 / M + 20 * $10 / M = $0.0002425. Its ceiling
    # counts its body of over 110 bytes, plus 64, as input: more than $0.00055. With one call
    # in flight, a second fits $0.0008 at the estimate but not at the ceiling, so it waits.
    fake_openai_server.responder = lambda received: small_completion()
    apps = tmp_path / "apps.yaml"
    apps.write_text("budgets:\n  - {name: cap, amount_usd: 0.0008}\n", encoding="utf-8")
    arguments = ["--apps", str(apps), "--upstream", f"api.openai.com={fake_openai_server.url}"]
    arguments += ["--upstream-ca", str(test_authority.cert_path)]
    process = CosttapProcess(tmp_path / "data", arguments).start()
    route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
    first: list[object] = []
    second: list[object] = []
    already = len(fake_openai_server.received)
    slow = threading.Thread(target=capped_call, args=(first,))
    slow.start()
    wait_for_request(fake_openai_server, already)
    waiting = threading.Thread(target=capped_call, args=(second,))
    waiting.start()
    deadline = time.monotonic() + 15
    while "waiting for calls in flight" not in process.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    waiting.join(timeout=30)
    slow.join(timeout=30)
    exit_code = process.process.wait(timeout=30)

    assert first == [200]
    [denial] = second
    assert isinstance(denial, openai.APIStatusError)
    assert denial.status_code == 402
    assert "costtap stopped while it waited" in str(denial)
    # The OpenAI SDK retries it, since it may fit once the call in flight has finished.
    assert denial.response.headers["x-should-retry"] == "true"
    assert exit_code == 0
    probe = LedgerProbe(process.data_dir)
    statuses = sorted(row["status"] for row in probe.rows(probe.request_ids()))
    assert statuses == ["denied", "success"]


def test_call_open_at_stop_deadline_is_recorded_cancelled(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    fake_openai_server.responder = lambda received: small_completion()
    arguments = ["--upstream", f"api.openai.com={fake_openai_server.url}"]
    arguments += ["--upstream-ca", str(test_authority.cert_path)]
    environment = {**os.environ, "COSTTAP_STOP_TIMEOUT": "0.5"}
    process = CosttapProcess(tmp_path / "data", arguments, env=environment).start()
    route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
    outcomes: list[object] = []
    already = len(fake_openai_server.received)
    client = threading.Thread(target=lambda: capped_call_or_error(outcomes))
    client.start()
    wait_for_request(fake_openai_server, already)
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    exit_code = process.process.wait(timeout=30)
    client.join(timeout=30)

    assert exit_code == 0
    probe = LedgerProbe(process.data_dir)
    [row] = probe.rows(probe.request_ids())
    assert row["status"] == "cancelled"
    assert "recording the metered calls still open at stop as cancelled: 1" in process.log()
    assert "Traceback" not in process.log()


def capped_call_or_error(outcomes: list[object]) -> None:
    try:
        capped_call(outcomes)
    except openai.APIConnectionError as error:
        outcomes.append(error)


def slow_headers(received: ReceivedRequest) -> Reply:
    """Reply with a small completion whose status line comes only after 5 s."""
    reply = small_completion()
    return Reply(reply.chunks, headers=reply.headers, pause_before_headers=5)


# A call sent upstream with no response yet is recorded at its preflight estimate: 17 input
# tokens ("x" * 40 is 10, plus 4 for the message and 3 for the reply) and its cap of 20.
SENT_ESTIMATE = {"input_tokens": 17, "output_tokens": 20}


def test_call_cut_before_response_records_estimate(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    fake_openai_server.responder = slow_headers
    arguments = ["--upstream", f"api.openai.com={fake_openai_server.url}"]
    arguments += ["--upstream-ca", str(test_authority.cert_path)]
    environment = {**os.environ, "COSTTAP_STOP_TIMEOUT": "0.5"}
    process = CosttapProcess(tmp_path / "data", arguments, env=environment).start()
    route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
    outcomes: list[object] = []
    already = len(fake_openai_server.received)
    client = threading.Thread(target=lambda: capped_call_or_error(outcomes))
    client.start()
    wait_for_request(fake_openai_server, already)
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    exit_code = process.process.wait(timeout=30)
    client.join(timeout=30)

    assert exit_code == 0
    probe = LedgerProbe(process.data_dir)
    [row] = probe.rows(probe.request_ids())
    assert row["status"] == "cancelled"
    assert row["units"] == SENT_ESTIMATE
    assert row["estimated"] == 1
    # gpt-4o: 17 * $2.50 / M + 20 * $10 / M.
    assert row["cost_usd"] == pytest.approx(0.0002425)


def test_client_giving_up_records_estimate(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    fake_openai_server.responder = slow_headers
    process = start_costtap(tmp_path / "data", fake_openai_server.url, test_authority.cert_path)
    try:
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
        with pytest.raises(openai.APITimeoutError):
            openai.OpenAI(max_retries=0, timeout=1).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x" * 40}], max_tokens=20
            )
        probe = LedgerProbe(process.data_dir)
        deadline = time.monotonic() + 15
        while not probe.request_ids() and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = probe.rows(probe.request_ids())
    finally:
        process.stop()

    [row] = rows
    assert row["status"] == "cancelled"
    assert row["units"] == SENT_ESTIMATE
    assert row["estimated"] == 1

"""Calls that end early: at a stop (finished, denied or cut) or when a client gives up."""

from __future__ import annotations

import contextlib
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
from tests.support.openai_fake import (
    CAPPED_CHAT,
    CAPPED_CHAT_COST_USD,
    CAPPED_CHAT_ESTIMATE,
    chat_reply,
    json_reply,
    usage_completion,
)
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


def slow_completion() -> Reply:
    """Reply with a gpt-4o completion whose body ends 3 s after its first byte."""
    return json_reply(usage_completion("gpt-4o-2024-08-06", 17, 20), pause_after_first=3)


def wait_for_request(fake: FakeUpstream, already: int) -> None:
    """Wait until the fake has received a request beyond the first `already`."""
    deadline = time.monotonic() + 15
    while len(fake.received) <= already and time.monotonic() < deadline:
        time.sleep(0.05)


def capped_call(outcomes: list[object]) -> None:
    try:
        openai.OpenAI(max_retries=0, timeout=30).chat.completions.create(**CAPPED_CHAT)
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
    fake_openai_server.responder = lambda received: slow_completion()
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


def stop_during_call(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake: FakeUpstream,
    authority: TestAuthority,
) -> CosttapProcess:
    """Send one capped call, then stop costtap while it is open; return the stopped process.

    The stop waits 0.5 s for open calls, so a slow reply is still open at its deadline.
    """
    arguments = [
        "--upstream",
        f"api.openai.com={fake.url}",
        "--upstream-ca",
        str(authority.cert_path),
    ]
    environment = {**os.environ, "COSTTAP_STOP_TIMEOUT": "0.5"}
    process = CosttapProcess(tmp_path / "data", arguments, env=environment).start()
    route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
    already = len(fake.received)
    client = threading.Thread(target=capped_call_or_error)
    client.start()
    wait_for_request(fake, already)
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    process.process.wait(timeout=30)
    client.join(timeout=30)
    return process


def capped_call_or_error() -> None:
    """Send a capped call that costtap may cut off; its outcome does not matter."""
    with contextlib.suppress(openai.APIError):
        capped_call([])


def test_call_open_at_stop_deadline_is_recorded_cancelled(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    fake_openai_server.responder = lambda received: slow_completion()

    process = stop_during_call(tmp_path, monkeypatch, fake_openai_server, test_authority)

    assert process.process is not None
    assert process.process.returncode == 0
    probe = LedgerProbe(process.data_dir)
    [row] = probe.rows(probe.request_ids())
    assert row["status"] == "cancelled"
    assert "recording the metered calls still open at stop as cancelled: 1" in process.log()
    assert "Traceback" not in process.log()


def slow_headers(received: ReceivedRequest) -> Reply:
    """Reply with a small completion whose status line comes only after 5 s."""
    reply = json_reply(usage_completion("gpt-4o-2024-08-06", 17, 20))
    return Reply(reply.chunks, headers=reply.headers, pause_before_headers=5)


def test_call_cut_before_response_records_estimate(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    fake_openai_server.responder = slow_headers

    process = stop_during_call(tmp_path, monkeypatch, fake_openai_server, test_authority)

    assert process.process is not None
    assert process.process.returncode == 0
    probe = LedgerProbe(process.data_dir)
    [row] = probe.rows(probe.request_ids())
    assert row["status"] == "cancelled"
    # A call sent upstream with no response yet is recorded at its preflight estimate.
    assert row["units"] == CAPPED_CHAT_ESTIMATE
    assert row["estimated"] == 1
    assert row["cost_usd"] == pytest.approx(CAPPED_CHAT_COST_USD)


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
            openai.OpenAI(max_retries=0, timeout=1).chat.completions.create(**CAPPED_CHAT)
        probe = LedgerProbe(process.data_dir)
        deadline = time.monotonic() + 15
        while not probe.request_ids() and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = probe.rows(probe.request_ids())
    finally:
        process.stop()

    [row] = rows
    assert row["status"] == "cancelled"
    assert row["units"] == CAPPED_CHAT_ESTIMATE
    assert row["estimated"] == 1

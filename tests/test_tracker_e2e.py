"""Remote mode end to end: costtap, `costtap tracker serve`, and failures in between.

Every process is real and listens on 127.0.0.1: the fake OpenAI upstream, costtap in remote
mode, the tracker, and where a test needs it a chaos proxy that fails tracker requests on
purpose. Loads are bounded in calls and time. Each call carries a unique `user` value in
its body, which costtap records as the user, so that events are matched to calls.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.chaos import ChaosProxy, ChaosSettings
from tests.support.clients import admin_get, route_clients_through
from tests.support.corpus import Case
from tests.support.costtap_process import (
    CosttapProcess,
    TrackerProcess,
    costtap_command,
    write_trust_bundle,
)
from tests.support.fake_upstream import FakeUpstream, ReceivedRequest, Reply
from tests.support.openai_fake import chat_reply, json_reply
from tests.support.pki import TestAuthority

pytestmark = pytest.mark.e2e

KEY = "ct_live_" + "k" * 24
WRONG_KEY = "ct_live_" + "x" * 24
CASE = Case("openai", "chat-nonstream-gpt4o-basic")
DELIVERY_TIMEOUT = 60.0

COSTTAP_APPS = """\
default_app: rich
apps:
  - name: rich
    match: {header: {name: X-Costtap-App, value: rich}}
    user: [{body: user}]
  - name: poor
    match: {header: {name: X-Costtap-App, value: poor}}
    user: [{body: user}]
  - name: careful
    match: {header: {name: X-Costtap-App, value: careful}}
    user: [{body: user}]
    tracker_unreachable: deny
"""
# The gpt-4o call's estimate is about $0.01 (1024 output tokens at $10 per million), far
# above this budget, so the tracker denies every call of app "poor".
TRACKER_APPS = """\
budgets:
  - {name: poor-cap, scope: app, id: poor, amount_usd: 0.001, hard: true}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackerProcess]:
    apps = tmp_path / "tracker-apps.yaml"
    apps.write_text(TRACKER_APPS)
    process = TrackerProcess(tmp_path / "tracker", [KEY], apps=apps).start()
    yield process
    process.stop()


@pytest.fixture
def upstream(fake_openai_server: FakeUpstream) -> FakeUpstream:
    fake_openai_server.responder = lambda received: chat_reply(CASE, received)
    fake_openai_server.received.clear()
    return fake_openai_server


def start_remote(
    data_dir: Path,
    tracker_url: str,
    fake: FakeUpstream,
    authority: TestAuthority,
    key: str = KEY,
    port: int = 0,
    **environment: str,
) -> CosttapProcess:
    apps = data_dir.parent / "costtap-apps.yaml"
    apps.parent.mkdir(parents=True, exist_ok=True)
    apps.write_text(COSTTAP_APPS)
    env = {
        **os.environ,
        "COST_TRACKER_BASE_URL": tracker_url,
        "COST_TRACKER_API_KEY": key,
        "COSTTAP_RECORD_TIMEOUT": "1",
        **environment,
    }
    arguments = [
        "--apps",
        str(apps),
        "--upstream",
        f"api.openai.com={fake.url}",
        "--upstream-ca",
        str(authority.cert_path),
    ]
    process = CosttapProcess(data_dir, arguments, env=env)
    if port:
        process.listen_port = port
    return process.start()


class Load:
    """Chat calls from a few threads, each with a unique `user` tag, bounded in count."""

    def __init__(self, app: str = "rich", prefix: str = "call") -> None:
        self.app = app
        self.prefix = prefix
        self.completed: list[str] = []
        self.failed: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self, count: int, workers: int = 3, pause: float = 0.0) -> None:
        threads = [threading.Thread(target=self._work, args=(count, pause)) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    def stop(self) -> None:
        self._stop.set()

    def _take(self, count: int) -> str | None:
        with self._lock:
            if self._next >= count or self._stop.is_set():
                return None
            self._next += 1
            return f"{self.prefix}-{self._next}"

    def _work(self, count: int, pause: float) -> None:
        client = openai.OpenAI(
            max_retries=0,
            timeout=15,
            default_headers={"X-Costtap-App": self.app},
            http_client=None,
        )
        while (tag := self._take(count)) is not None:
            try:
                client.chat.completions.create(**CASE.request_body, user=tag)
            except openai.APIError:
                with self._lock:
                    self.failed.append(tag)
            else:
                with self._lock:
                    self.completed.append(tag)
            if pause:
                time.sleep(pause)


def wait_for_completed(load: Load, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(load.completed) < count:
        assert time.monotonic() < deadline, (
            f"only {len(load.completed)} calls completed, {len(load.failed)} failed"
        )
        time.sleep(0.01)


def wait_for_events(
    tracker: TrackerProcess, tags: list[str], timeout: float = DELIVERY_TIMEOUT
) -> list[dict[str, Any]]:
    """Wait until every tag has an event at the tracker; return all events."""
    deadline = time.monotonic() + timeout
    while True:
        events = tracker.events()
        seen = {event["user"] for event in events}
        if set(tags) <= seen:
            return events
        if time.monotonic() > deadline:
            missing = sorted(set(tags) - seen)
            raise AssertionError(
                f"{len(missing)} calls have no event after {timeout} s: {missing[:10]}"
            )
        time.sleep(0.2)


def assert_exactly_once(events: list[dict[str, Any]], tags: list[str]) -> None:
    per_tag = Counter(event["user"] for event in events)
    assert {tag: per_tag[tag] for tag in tags} == dict.fromkeys(tags, 1)
    assert all(count == 1 for count in per_tag.values()), [
        tag for tag, count in per_tag.items() if count > 1
    ]
    request_ids = [event["request_id"] for event in events]
    assert len(request_ids) == len(set(request_ids))


def test_allow_and_deny_through_tracker(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracker: TrackerProcess,
    upstream: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    process = start_remote(tmp_path / "costtap", tracker.url, upstream, test_authority)
    try:
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))

        rich = openai.OpenAI(default_headers={"X-Costtap-App": "rich"})
        completion = rich.chat.completions.create(**CASE.request_body, user="ana")
        assert completion.choices[0].message.content == "The capital of France is Paris."

        # The SDK's default retries stay on: a 402 must not be retried.
        poor = openai.OpenAI(default_headers={"X-Costtap-App": "poor"})
        with pytest.raises(openai.APIStatusError) as denied:
            poor.chat.completions.create(**CASE.request_body, user="bob")

        events = {event["user"]: event for event in wait_for_events(tracker, ["ana", "bob"])}
    finally:
        process.stop()

    assert denied.value.status_code == 402
    assert denied.value.response.headers["x-should-retry"] == "false"
    error = denied.value.response.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["message"].startswith(
        "costtap: budget 'poor-cap' for app poor would be exceeded: $0.00 of $0.001 is used or reserved this month"
    )
    assert len(upstream.received) == 1  # only the allowed call reached the provider
    assert process.log().count("call denied") == 1  # the denied call was sent once
    # The denied call is recorded too, with its status and no units.
    assert (events["bob"]["status"], events["bob"]["units"], events["bob"]["cost_usd"]) == (
        "denied",
        {},
        0.0,
    )
    event = events["ana"]
    assert event["app"] == "rich"
    assert event["units"] == {"input_tokens": 24, "output_tokens": 8}
    assert event["model"] == "gpt-4o-2024-08-06"
    # gpt-4o: 24 input tokens at $2.50 and 8 output tokens at $10 per million.
    assert event["cost_usd"] == pytest.approx(24 * 2.5e-6 + 8 * 10e-6, rel=1e-9)


def test_tracker_down_during_load(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracker: TrackerProcess,
    upstream: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    process = start_remote(tmp_path / "costtap", tracker.url, upstream, test_authority)
    try:
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
        load = Load()
        runner = threading.Thread(target=load.run, args=(45,), kwargs={"workers": 3, "pause": 0.05})
        runner.start()
        wait_for_completed(load, 10)
        tracker.stop()
        time.sleep(2.0)
        tracker.start()
        runner.join(timeout=120)

        events = wait_for_events(tracker, load.completed)
    finally:
        process.stop()

    assert load.failed == []
    assert len(load.completed) == 45
    assert_exactly_once(events, load.completed)


def test_tracker_failing_at_random(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracker: TrackerProcess,
    upstream: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    chaos = ChaosProxy(
        tracker.url, ChaosSettings(fail_before=0.2, fail_after=0.2, stall=0.1, stall_seconds=2.0)
    ).start()
    process = start_remote(tmp_path / "costtap", chaos.url, upstream, test_authority)
    try:
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
        load = Load()
        load.run(40, workers=3)

        events = wait_for_events(tracker, load.completed)
    finally:
        process.stop()
        chaos.stop()

    assert load.failed == []
    assert len(load.completed) == 40
    assert_exactly_once(events, load.completed)
    # The test is only worth something if each failure kind happened.
    assert chaos.settings.counts.get("fail_before", 0) > 0
    assert chaos.settings.counts.get("fail_after", 0) > 0
    assert chaos.settings.counts.get("stall", 0) > 0


def test_sigkill_during_load_five_times(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracker: TrackerProcess,
    upstream: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    port = free_port()
    data_dir = tmp_path / "costtap"
    completed: list[str] = []
    failed: list[str] = []
    for round_number in range(5):
        process = start_remote(data_dir, tracker.url, upstream, test_authority, port=port)
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
        load = Load(prefix=f"round{round_number}")
        runner = threading.Thread(target=load.run, args=(400,), kwargs={"workers": 3})
        runner.start()
        wait_for_completed(load, 8)
        assert process.process is not None
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(timeout=10)
        load.stop()
        runner.join(timeout=60)
        completed += load.completed
        failed += load.failed

    # A normal run delivers what the killed ones left in the outbox.
    process = start_remote(data_dir, tracker.url, upstream, test_authority, port=port)
    try:
        events = wait_for_events(tracker, completed)
    finally:
        process.stop()

    per_tag = Counter(event["user"] for event in events)
    assert {tag: per_tag[tag] for tag in completed} == dict.fromkeys(completed, 1)
    # A call cut by the kill may or may not have been recorded, but never twice.
    assert all(count == 1 for count in per_tag.values())
    assert len(completed) >= 40


def test_wrong_key_waits_in_outbox(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracker: TrackerProcess,
    upstream: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    data_dir = tmp_path / "costtap"
    process = start_remote(data_dir, tracker.url, upstream, test_authority, key=WRONG_KEY)
    try:
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
        load = Load()
        load.run(5, workers=1)
        # The gauge is read at every scrape, before /readyz was ever asked.
        metrics_before_readyz = admin_get(process, "/metrics")[1]
        deadline = time.monotonic() + 20
        while admin_get(process, "/readyz")[0] != 503:
            assert time.monotonic() < deadline, "readiness never failed"
            time.sleep(0.1)
        ready_status, ready_body = admin_get(process, "/readyz")
    finally:
        process.stop()

    assert load.completed and load.failed == []
    assert "costtap_outbox_pending 5.0" in metrics_before_readyz
    assert ready_status == 503
    assert "rejected COST_TRACKER_API_KEY (401)" in json.loads(ready_body)["reason"]
    assert "rejected the API key (401): check COST_TRACKER_API_KEY" in process.log()
    assert WRONG_KEY not in process.log()
    assert tracker.events() == []
    status = subprocess.run(
        costtap_command("outbox", "status", "--data-dir", str(data_dir)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pending: 5" in status.stdout

    # The key is fixed: the waiting records are delivered, once each.
    process = start_remote(data_dir, tracker.url, upstream, test_authority)
    try:
        events = wait_for_events(tracker, load.completed)
    finally:
        process.stop()
    assert_exactly_once(events, load.completed)


def test_preflight_timeout_follows_app_policy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracker: TrackerProcess,
    upstream: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    chaos = ChaosProxy(tracker.url, ChaosSettings(preflight_delay=1.5)).start()
    process = start_remote(
        tmp_path / "costtap", chaos.url, upstream, test_authority, COSTTAP_PREFLIGHT_TIMEOUT="0.3"
    )
    try:
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))

        allowed = openai.OpenAI(max_retries=0, default_headers={"X-Costtap-App": "rich"})
        allowed.chat.completions.create(**CASE.request_body, user="allowed-1")
        careful = openai.OpenAI(max_retries=0, default_headers={"X-Costtap-App": "careful"})
        with pytest.raises(openai.APIStatusError) as denied:
            careful.chat.completions.create(**CASE.request_body, user="careful-1")

        events = wait_for_events(tracker, ["allowed-1"])
    finally:
        process.stop()
        chaos.stop()

    assert denied.value.status_code == 402
    assert "could not be reached" in denied.value.response.json()["error"]["message"]
    assert [json.loads(received.body)["user"] for received in upstream.received] == ["allowed-1"]
    assert {event["user"] for event in events} >= {"allowed-1"}


def test_tracker_hold_lets_sidecar_client_retry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstream: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    # The recorded call sets no output cap, so it is estimated at about $0.0103 (1024 output
    # tokens at $10 per million) and counts at 4 times that while in flight. A second call
    # fits $0.03 next to the first one's estimate but not next to $0.041, so it waits.
    apps = tmp_path / "tracker-apps.yaml"
    apps.write_text("budgets:\n  - {name: rich-cap, scope: app, id: rich, amount_usd: 0.03}\n")
    tracker = TrackerProcess(tmp_path / "tracker", [KEY], apps=apps).start()

    def slow_reply(received: ReceivedRequest) -> Reply:
        return json_reply(b"".join(chat_reply(CASE, received).chunks), pause_after_first=3)

    upstream.responder = slow_reply
    process = start_remote(tmp_path / "costtap", tracker.url, upstream, test_authority)
    try:
        route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))
        client = openai.OpenAI(max_retries=0, default_headers={"X-Costtap-App": "rich"})
        slow = threading.Thread(target=lambda: client.chat.completions.create(**CASE.request_body))
        slow.start()
        deadline = time.monotonic() + 15
        while not upstream.received and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as denial:
            client.chat.completions.create(**CASE.request_body)
        slow.join(timeout=30)
    finally:
        process.stop()
        tracker.stop()

    assert denial.value.status_code == 402
    assert denial.value.response.headers["x-should-retry"] == "true"
    assert "it waited 1 s for them to finish, so retry later" in str(denial.value)

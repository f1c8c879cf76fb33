"""Budgets, alerts and unpriced models in local mode, through a real costtap."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.support.clients import admin_get, metric_value, route_clients_through
from tests.support.costtap_process import CosttapProcess, LedgerProbe, write_trust_bundle
from tests.support.fake_upstream import FakeUpstream, ReceivedRequest, Reply
from tests.support.openai_fake import (
    CAPPED_CHAT,
    CAPPED_CHAT_COST_USD,
    json_reply,
    usage_completion,
)
from tests.support.pki import TestAuthority

pytestmark = pytest.mark.e2e

M = 1_000_000


def start_local(
    data_dir: Path, apps_text: str, fake: FakeUpstream, authority: TestAuthority
) -> CosttapProcess:
    apps = data_dir.parent / "apps.yaml"
    apps.parent.mkdir(parents=True, exist_ok=True)
    apps.write_text(apps_text)
    arguments = [
        "--apps",
        str(apps),
        "--upstream",
        f"api.openai.com={fake.url}",
        "--upstream-ca",
        str(authority.cert_path),
    ]
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("COST_TRACKER_")
    }
    return CosttapProcess(data_dir, arguments, env=environment).start()


def use_proxy(monkeypatch: pytest.MonkeyPatch, process: CosttapProcess) -> None:
    route_clients_through(monkeypatch, process.proxy_url, write_trust_bundle(process))


def spent_usd(data_dir: Path) -> float:
    probe = LedgerProbe(data_dir)
    rows = probe.rows(probe.request_ids()) if probe.request_ids() else []
    return sum(row["cost_usd"] or 0.0 for row in rows)


def send_concurrently(count: int) -> list[int]:
    """Send `count` identical chat calls at once; return each one's HTTP status."""

    async def call_all() -> list[int]:
        client = openai.AsyncOpenAI(max_retries=0, timeout=120)

        async def one() -> int:
            try:
                await client.chat.completions.create(**CAPPED_CHAT)
            except openai.APIStatusError as error:
                return error.status_code
            return 200

        results = await asyncio.gather(*(one() for _ in range(count)))
        await client.close()
        return list(results)

    return asyncio.run(call_all())


def wait_for_records(process: CosttapProcess, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(LedgerProbe(process.data_dir).request_ids()) < count and time.monotonic() < deadline:
        time.sleep(0.1)


HARD_CAP = (
    "budgets:\n  - {name: cap, scope: all, amount_usd: 0.01, hard: true, thresholds: [2.0]}\n"
)


def test_concurrent_calls_cannot_overspend(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    # The fake reports exactly the estimated usage, so a call costs what preflight reserved.
    # A $0.01 budget admits 41 calls, 41 * 0.0002425 = 0.0099425, because a 42nd would make
    # 0.010185.
    fake_openai_server.responder = lambda received: json_reply(
        usage_completion("gpt-4o-2024-08-06", 17, 20)
    )
    process = start_local(tmp_path / "data", HARD_CAP, fake_openai_server, test_authority)
    try:
        use_proxy(monkeypatch, process)
        statuses = send_concurrently(200)
        wait_for_records(process, 200)
    finally:
        process.stop()

    allowed = statuses.count(200)
    assert statuses.count(402) == 200 - allowed
    committed = spent_usd(process.data_dir)
    # Actual equals estimate for every call here, so the allowed overspend is zero.
    assert committed <= 0.01 + 1e-12
    assert allowed == 41
    assert committed == pytest.approx(41 * CAPPED_CHAT_COST_USD, rel=1e-9)


def test_hard_budget_bounds_underestimated_calls(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    # The fake bills more input than estimated: call i reports 17 + 2 * (i % 50) prompt
    # tokens, so a call costs up to 98 * $2.50 / M = $0.000245 more than its estimate. That
    # is within the call's ceiling, since its body alone is over 115 bytes.
    answered = itertools.count()

    def underestimated(received: ReceivedRequest) -> Reply:
        extra = 2 * (next(answered) % 50)
        return json_reply(usage_completion("gpt-4o-2024-08-06", 17 + extra, 20))

    fake_openai_server.responder = underestimated
    process = start_local(tmp_path / "data", HARD_CAP, fake_openai_server, test_authority)
    try:
        use_proxy(monkeypatch, process)
        statuses = send_concurrently(200)
        wait_for_records(process, 200)
        held_calls = metric_value(process, 'costtap_budget_held_calls_total{app="default"}')
    finally:
        process.stop()

    assert statuses.count(200) + statuses.count(402) == 200
    # A call's ceiling is over $0.0005, so fewer than 20 fit in $0.01 at once: with 200
    # sent together, some had to wait for others.
    assert held_calls > 0
    committed = spent_usd(process.data_dir)
    largest_underestimate = 98 * 2.50 / M
    assert committed <= 0.01 + largest_underestimate + 1e-12
    # The budget is used up, not left idle: the last denial found less than one estimate
    # left, and no call cost less than its estimate.
    assert committed > 0.01 - CAPPED_CHAT_COST_USD


class WebhookReceiver:
    """Collect JSON posts on 127.0.0.1 in a thread of its own."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        async def receive(request: web.Request) -> web.Response:
            self.received.append(await request.json())
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/alerts", receive)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


def test_each_threshold_alerts_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
    webhook: WebhookReceiver,
) -> None:
    # Each call costs 1000 * $2.50 / M + 100 * $10 / M = $0.0035 (gpt-4o). With a soft
    # $0.01 budget, spend after each call is 0.0035, 0.0070, 0.0105, 0.0140, 0.0175, so
    # 50% fires after call 2, 80% and 100% after call 3, and nothing fires again.
    fake_openai_server.responder = lambda received: json_reply(
        usage_completion("gpt-4o-2024-08-06", 1000, 100)
    )
    apps = (
        f"alert_webhook: http://127.0.0.1:{webhook.port}/alerts\n"
        "budgets:\n"
        "  - {name: team, scope: app, id: default, window: month, amount_usd: 0.01, hard: false, "
        "thresholds: [0.5, 0.8, 1.0]}\n"
    )
    process = start_local(tmp_path / "data", apps, fake_openai_server, test_authority)
    try:
        use_proxy(monkeypatch, process)
        client = openai.OpenAI(max_retries=0)
        crossings = []
        for _ in range(5):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=100
            )
            time.sleep(0.3)
            crossings.append(len(webhook.received))
        deadline = time.monotonic() + 10
        while len(webhook.received) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        process.stop()

    assert crossings == [0, 1, 3, 3, 3]
    assert [alert["threshold"] for alert in webhook.received] == [0.5, 0.8, 1.0]
    first = webhook.received[0]
    assert first["budget"] == "team"
    assert first["scope"] == "app"
    assert first["scope_value"] == "default"
    assert first["spent_usd"] == pytest.approx(0.007)
    assert first["amount_usd"] == 0.01
    log = process.log()
    assert log.count("budget 'team' for app default crossed 50% of $0.01 this month") == 1
    assert log.count("crossed 80%") == 1
    assert log.count("crossed 100%") == 1


def test_unpriced_model_null_warned_once_and_counted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    def reply(received: ReceivedRequest) -> Reply:
        return json_reply(usage_completion("mystery-model-7", 12, 3))

    fake_openai_server.responder = reply
    process = start_local(tmp_path / "data", "apps: []\n", fake_openai_server, test_authority)
    try:
        use_proxy(monkeypatch, process)
        client = openai.OpenAI(max_retries=0)
        for _ in range(2):
            client.chat.completions.create(
                model="mystery-model-7", messages=[{"role": "user", "content": "hi"}]
            )
        deadline = time.monotonic() + 10
        while len(LedgerProbe(process.data_dir).request_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = admin_get(process, "/metrics")[1]
    finally:
        process.stop()

    probe = LedgerProbe(process.data_dir)
    rows = probe.rows(probe.request_ids())
    assert [row["cost_usd"] for row in rows] == [None, None]
    assert [row["units"] for row in rows] == [{"input_tokens": 12, "output_tokens": 3}] * 2
    assert process.log().count("model mystery-model-7 of openai is unpriced") == 1
    assert 'costtap_unpriced_calls_total{model="mystery-model-7",provider="openai"} 2.0' in metrics

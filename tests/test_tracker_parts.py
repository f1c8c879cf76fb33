"""Remote-mode parts on their own: settings, the outbox, the sender's dead letters, the server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from costtap.config.settings import ConfigError
from costtap.config.tracker import load_tracker_settings
from costtap.providers.base import Units
from costtap.tracker.events import Status, UsageEvent
from costtap.tracker.outbox import Outbox
from costtap.tracker.remote import RemoteTracker, backoff_seconds
from tests.support.costtap_process import TrackerProcess, costtap_command

KEY = "ct_live_" + "a" * 24
URL = "https://tracker.example.internal/cost-tracker/v1"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"COST_TRACKER_BASE_URL": "tracker.internal/v1", "COST_TRACKER_API_KEY": KEY},
            "invalid URL",
        ),
        ({"COST_TRACKER_BASE_URL": URL}, "COST_TRACKER_API_KEY is missing"),
        (
            {"COST_TRACKER_BASE_URL": URL, "COST_TRACKER_API_KEY": "   "},
            "COST_TRACKER_API_KEY is missing",
        ),
        (
            {"COST_TRACKER_BASE_URL": URL, "COST_TRACKER_API_KEY": "secret"},
            "COST_TRACKER_API_KEY is malformed",
        ),
        (
            {
                "COST_TRACKER_BASE_URL": URL,
                "COST_TRACKER_API_KEY": "ct_live_abc def ghi jkl mno pqr",
            },
            "COST_TRACKER_API_KEY is malformed",
        ),
        (
            {
                "COST_TRACKER_BASE_URL": URL,
                "COST_TRACKER_API_KEY": KEY,
                "COSTTAP_PREFLIGHT_TIMEOUT": "0",
            },
            "COSTTAP_PREFLIGHT_TIMEOUT: 0 is out of range",
        ),
    ],
)
def test_tracker_settings_rejected(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_tracker_settings(environ)


def test_tracker_settings_strip_key_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_tracker_settings(
        {"COST_TRACKER_BASE_URL": URL + "/", "COST_TRACKER_API_KEY": f"  {KEY}\n"}
    )

    assert settings is not None
    assert settings.api_key == KEY
    assert settings.base_url == URL
    assert settings.url("usage/record") == URL + "/usage/record"
    assert settings.preflight_timeout == 1.5
    assert settings.hidden_key == "ct_live_…"
    assert "surrounding white space" in caplog.text
    assert KEY not in caplog.text


def test_local_mode_without_base_url() -> None:
    assert load_tracker_settings({"COST_TRACKER_API_KEY": KEY}) is None


def test_run_rejects_malformed_key(tmp_path: Path) -> None:
    environment = {**os.environ, "COST_TRACKER_BASE_URL": URL, "COST_TRACKER_API_KEY": "nope"}

    result = subprocess.run(
        costtap_command("run", "--data-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )

    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("costtap: COST_TRACKER_API_KEY is malformed")
    )


def test_backoff_grows_and_is_capped() -> None:
    # Full jitter between half and all of min(60, 0.5 * 2**attempts) seconds.
    for attempts, (low, high) in {0: (0.25, 0.5), 3: (2.0, 4.0), 10: (30.0, 60.0)}.items():
        delays = [backoff_seconds(attempts) for _ in range(50)]
        assert all(low <= delay <= high for delay in delays)


def test_outbox_dead_letters_and_retry(tmp_path: Path) -> None:
    outbox = Outbox.in_dir(tmp_path)
    assert outbox.add("r1", {"n": 1}) is True
    assert outbox.add("r1", {"n": 1}) is False  # one record per request id
    outbox.add("r2", {"n": 2})
    outbox.retry_later("r2", "HTTP 503", next_attempt_at=0)

    outbox.move_to_dead_letters("r1", "HTTP 422: bad units")

    assert [record.request_id for record in outbox.due(10)] == ["r2"]
    assert outbox.dead_letters() == [("r1", "HTTP 422: bad units")]
    status = outbox.status()
    assert (status.pending, status.dead, status.last_error) == (1, 1, "HTTP 503")
    assert outbox.retry_all() == (1, 1)
    assert sorted(record.request_id for record in outbox.due(10)) == ["r1", "r2"]
    assert outbox.dead_letters() == []


def make_event(request_id: str) -> UsageEvent:
    from datetime import UTC, datetime

    return UsageEvent(
        request_id=request_id,
        time=datetime(2026, 12, 1, tzinfo=UTC),
        app="video",
        provider="openai",
        endpoint="chat.completions",
        model="gpt-4o",
        units=Units(input_tokens=5, output_tokens=2),
        status=Status.SUCCESS,
        estimated=False,
        user="u-1",
        extra={"user_email": "ana@example.com", "user_name": "Ana Example"},
    )


def test_rejected_record_goes_to_dead_letters(tmp_path: Path) -> None:
    """A 4xx other than 401, 408 and 429 is final: the record moves to dead letters."""
    received: list[tuple[str, Any]] = []

    async def scenario() -> tuple[int, list[tuple[str, str]]]:
        async def record(request: web.Request) -> web.Response:
            received.append((request.path, await request.json()))
            return web.json_response(
                {"detail": "units.input_tokens must be an integer"}, status=422
            )

        async def upsert(request: web.Request) -> web.Response:
            received.append((request.path, await request.json()))
            return web.json_response({})

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "db": "ok"})

        app = web.Application()
        app.router.add_post("/v1/usage/record", record)
        app.router.add_post("/v1/users/upsert", upsert)
        app.router.add_get("/v1/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        settings = load_tracker_settings(
            {"COST_TRACKER_BASE_URL": f"http://127.0.0.1:{port}/v1", "COST_TRACKER_API_KEY": KEY}
        )
        assert settings is not None
        tracker = RemoteTracker(settings, tmp_path)
        await tracker.start()
        await tracker.record(make_event("r-dead"))
        await tracker.record(make_event("r-dead-2"))
        for _ in range(100):
            if tracker.pending_records() == 0:
                break
            await asyncio.sleep(0.05)
        await tracker.stop(flush_seconds=1)
        await runner.cleanup()
        outbox = Outbox.in_dir(tmp_path)
        return outbox.pending_count(), outbox.dead_letters()

    pending, dead = asyncio.run(scenario())

    assert pending == 0
    assert [request_id for request_id, _ in dead] == ["r-dead", "r-dead-2"]
    assert dead[0][1].startswith("HTTP 422:")
    records = [body for path, body in received if path == "/v1/usage/record"]
    assert [body["request_id"] for body in records] == ["r-dead", "r-dead-2"]
    assert records[0]["units"] == {"input_tokens": 5, "output_tokens": 2}
    assert records[0]["source_app"] == "video"
    # The user is mirrored once per process, however many records name them.
    upserts = [body for path, body in received if path == "/v1/users/upsert"]
    assert upserts == [
        {"external_id": "u-1", "email": "ana@example.com", "full_name": "Ana Example"}
    ]


def post(url: str, body: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"text": text.decode()}


def test_tracker_server_contract(tmp_path: Path) -> None:
    tracker = TrackerProcess(tmp_path / "tracker", [KEY]).start()
    record = {
        "request_id": "req-1",
        "user_external_id": "u-42",
        "project_external_id": "p-7",
        "job_external_id": "job-9",
        "source_app": "video-accessibility-dev",
        "model": "gpt-4o",
        "units": {"input_tokens": 1000, "output_tokens": 100},
        "latency_ms": 1200,
        "status": "success",
    }
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(tracker.url + "/health", timeout=10) as response:
            health = json.loads(response.read())
        unauthorized = post(tracker.url + "/usage/record", record, None)
        wrong = post(tracker.url + "/usage/record", record, "ct_live_" + "z" * 24)
        first = post(tracker.url + "/usage/record", record, KEY)
        second = post(tracker.url + "/usage/record", record, KEY)
        invalid = post(tracker.url + "/usage/record", {**record, "units": {"tokens": 1}}, KEY)
        preflight = post(
            tracker.url + "/preflight",
            {
                "source_app": "video",
                "model": "gpt-4o",
                "estimated_units": {"input_tokens": 1000, "output_tokens": 2048},
            },
            KEY,
        )
        user = post(
            tracker.url + "/users/upsert", {"external_id": "u-42", "email": "ana@example.com"}, KEY
        )
        events = tracker.events()
    finally:
        tracker.stop()

    assert health == {"status": "ok", "db": "ok"}
    assert unauthorized[0] == 401
    assert wrong[0] == 401
    # gpt-4o: 1000 input tokens at $2.50 and 100 output tokens at $10 per million = $0.0035.
    assert first == (
        200,
        {"event_id": "req-1", "cost_usd": pytest.approx(0.0035), "duplicate": False},
    )
    assert second[1]["duplicate"] is True
    assert invalid[0] == 422
    assert preflight[0] == 200
    assert preflight[1]["allow"] is True
    # 1000 input at $2.50 and 2048 output at $10 per million = $0.02298.
    assert preflight[1]["estimated_cost_usd"] == pytest.approx(0.02298)
    assert preflight[1]["request_id"]
    assert user == (200, {"external_id": "u-42"})
    [event] = events
    assert (event["request_id"], event["user"], event["project"], event["job"]) == (
        "req-1",
        "u-42",
        "p-7",
        "job-9",
    )


def test_tracker_serve_needs_keys(tmp_path: Path) -> None:
    environment = {
        key: value for key, value in os.environ.items() if key != "COSTTAP_TRACKER_API_KEYS"
    }

    result = subprocess.run(
        costtap_command("tracker", "serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"),
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.strip().startswith("costtap: COSTTAP_TRACKER_API_KEYS is empty")


def test_outbox_cli_without_outbox(tmp_path: Path) -> None:
    result = subprocess.run(
        costtap_command("outbox", "status", "--data-dir", str(tmp_path)),
        capture_output=True,
        text=True,
    )

    assert result.returncode == 1
    assert "no outbox at" in result.stderr

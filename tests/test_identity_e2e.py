"""Identity end to end: the official SDK through costtap with an apps file.

Identity comes from headers the service already sends, the body's `user` field and the
proxy user name. The fake upstream records what reaches it, so the tests assert that
stripped headers and proxy credentials never get there.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.clients import admin_get, route_clients_through
from tests.support.corpus import Case
from tests.support.costtap_process import CosttapProcess, LedgerProbe, write_trust_bundle
from tests.support.fake_upstream import FakeUpstream
from tests.support.openai_fake import chat_reply
from tests.support.pki import TestAuthority

pytestmark = pytest.mark.e2e

TOKEN = "tok-video-123"
APPS = """\
default_app: shared
apps:
  - name: video
    match:
      proxy_user: video
      proxy_token: ${VIDEO_PROXY_TOKEN}
    user:
      - header: X-User-Id
        strip: true
      - body: user
      - proxy_user: true
    project:
      - header: X-Project-Id
        strip: true
    job:
      - header: X-Costtap-Job
  - name: search
    match:
      header: {name: X-Costtap-App, value: search}
    user:
      - body: user
"""
CASE = Case("openai", "chat-nonstream-gpt4o-basic")


def start(
    data_dir: Path, apps_text: str, fake: FakeUpstream, authority: TestAuthority
) -> CosttapProcess:
    apps = data_dir.parent / f"{data_dir.name}-apps.yaml"
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
    return CosttapProcess(
        data_dir, arguments, env={**os.environ, "VIDEO_PROXY_TOKEN": TOKEN}
    ).start()


@pytest.fixture(scope="module")
def identity_costtap(
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> Iterator[tuple[CosttapProcess, Path]]:
    process = start(
        tmp_path_factory.mktemp("identity") / "data", APPS, fake_openai_server, test_authority
    )
    try:
        yield process, write_trust_bundle(process)
    finally:
        process.stop()


def call(
    monkeypatch: pytest.MonkeyPatch,
    setup: tuple[CosttapProcess, Path],
    fake: FakeUpstream,
    credentials: str | None = None,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Make one chat call configured by environment; return its ledger row."""
    process, bundle = setup
    proxy = process.proxy_url
    if credentials is not None:
        proxy = proxy.replace("http://", f"http://{credentials}@")
    route_clients_through(monkeypatch, proxy, bundle)
    fake.responder = lambda received: chat_reply(CASE, received)
    fake.received.clear()
    ledger = LedgerProbe(process.data_dir)
    before = ledger.request_ids()

    client = openai.OpenAI(max_retries=0, default_headers=headers or {})
    client.chat.completions.create(**CASE.request_body, **fields)

    [row] = ledger.wait_for_new(before)
    return row


def test_identity_from_default_headers(
    monkeypatch: pytest.MonkeyPatch,
    identity_costtap: tuple[CosttapProcess, Path],
    fake_openai_server: FakeUpstream,
) -> None:
    headers = {"X-User-Id": "u-1", "X-Project-Id": "p-9", "X-Costtap-Job": "job-5"}

    row = call(monkeypatch, identity_costtap, fake_openai_server, f"video:{TOKEN}", headers)

    assert (row["app"], row["user"], row["project"], row["job"]) == ("video", "u-1", "p-9", "job-5")
    [received] = fake_openai_server.received
    for name in ("x-user-id", "x-project-id", "x-costtap-job", "proxy-authorization"):
        assert name not in received.headers


def test_identity_from_body_user(
    monkeypatch: pytest.MonkeyPatch,
    identity_costtap: tuple[CosttapProcess, Path],
    fake_openai_server: FakeUpstream,
) -> None:
    row = call(
        monkeypatch, identity_costtap, fake_openai_server, f"video:{TOKEN}", user="u-from-body"
    )

    assert (row["app"], row["user"]) == ("video", "u-from-body")
    [received] = fake_openai_server.received
    assert (
        json.loads(received.body)["user"] == "u-from-body"
    )  # the body reaches the provider unchanged


def test_identity_from_proxy_user(
    monkeypatch: pytest.MonkeyPatch,
    identity_costtap: tuple[CosttapProcess, Path],
    fake_openai_server: FakeUpstream,
) -> None:
    row = call(monkeypatch, identity_costtap, fake_openai_server, f"video:{TOKEN}")

    assert (row["app"], row["user"], row["project"]) == ("video", "video", None)


def test_app_from_header_without_credentials(
    monkeypatch: pytest.MonkeyPatch,
    identity_costtap: tuple[CosttapProcess, Path],
    fake_openai_server: FakeUpstream,
) -> None:
    row = call(
        monkeypatch,
        identity_costtap,
        fake_openai_server,
        headers={"X-Costtap-App": "search"},
        user="u-7",
    )

    assert (row["app"], row["user"]) == ("search", "u-7")
    [received] = fake_openai_server.received
    assert "x-costtap-app" not in received.headers


def test_credentials_win_over_app_header(
    monkeypatch: pytest.MonkeyPatch,
    identity_costtap: tuple[CosttapProcess, Path],
    fake_openai_server: FakeUpstream,
) -> None:
    row = call(
        monkeypatch,
        identity_costtap,
        fake_openai_server,
        f"video:{TOKEN}",
        {"X-Costtap-App": "search"},
    )

    assert row["app"] == "video"


def test_wrong_token_falls_back_to_default_app(
    monkeypatch: pytest.MonkeyPatch,
    identity_costtap: tuple[CosttapProcess, Path],
    fake_openai_server: FakeUpstream,
) -> None:
    row = call(monkeypatch, identity_costtap, fake_openai_server, "video:not-the-token")

    assert row["app"] == "shared"
    assert row["user"] is None
    assert "not-the-token" not in identity_costtap[0].log()


def connect_status(process: CosttapProcess, bundle: Path, credentials: str | None) -> int:
    """Open a tunnel to the provider host through costtap; return the CONNECT status."""
    headers = {}
    if credentials is not None:
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    context = ssl.create_default_context(cafile=str(bundle))
    connection = http.client.HTTPSConnection("127.0.0.1", process.port, context=context, timeout=10)
    connection.set_tunnel("api.openai.com", 443, headers=headers)
    try:
        connection.request("POST", "/v1/chat/completions", body=CASE.read(".request.json"))
        return connection.getresponse().status
    except OSError as error:
        # http.client reports a refused tunnel as "Tunnel connection failed: 407 ..."
        return int(str(error).split("Tunnel connection failed: ", 1)[1].split(" ", 1)[0])
    finally:
        connection.close()


def test_require_proxy_auth_gives_407(
    tmp_path: Path, fake_openai_server: FakeUpstream, test_authority: TestAuthority
) -> None:
    process = start(
        tmp_path / "data", "require_proxy_auth: true\n" + APPS, fake_openai_server, test_authority
    )
    try:
        bundle = write_trust_bundle(process)
        fake_openai_server.responder = lambda received: chat_reply(CASE, received)
        fake_openai_server.received.clear()

        without = connect_status(process, bundle, None)
        wrong = connect_status(process, bundle, "video:wrong-token")
        unknown = connect_status(process, bundle, "nobody:whatever")
        assert fake_openai_server.received == []
        valid = connect_status(process, bundle, f"video:{TOKEN}")
    finally:
        process.stop()

    assert (without, wrong, unknown) == (407, 407, 407)
    assert valid == 200
    assert len(fake_openai_server.received) == 1


def wait_for_log(process: CosttapProcess, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while process.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{process.log()}"
        time.sleep(0.05)


def test_reload_valid_and_invalid(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> None:
    process = start(tmp_path / "data", "default_app: first\n", fake_openai_server, test_authority)
    apps_file = tmp_path / "data-apps.yaml"
    try:
        setup = (process, write_trust_bundle(process))
        assert call(monkeypatch, setup, fake_openai_server)["app"] == "first"

        # A valid change, announced with SIGHUP, takes effect on the next call.
        apps_file.write_text("default_app: second\n")
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)
        wait_for_log(process, "reloaded (SIGHUP)")
        assert call(monkeypatch, setup, fake_openai_server)["app"] == "second"

        # A change noticed by the file watcher, without a signal.
        apps_file.write_text("default_app: third-app\n")
        wait_for_log(process, "reloaded (file changed)")
        assert call(monkeypatch, setup, fake_openai_server)["app"] == "third-app"

        # An invalid change is rejected and logged; the previous configuration stays.
        apps_file.write_text("default_app: fourth\napps:\n  - match: {}\n")
        wait_for_log(process, "rejected, previous configuration kept")
        assert call(monkeypatch, setup, fake_openai_server)["app"] == "third-app"
        assert "apps.0.name: Field required" in process.log()
    finally:
        process.stop()


def test_rejected_value_counted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch,
    identity_costtap: tuple[CosttapProcess, Path],
    fake_openai_server: FakeUpstream,
) -> None:
    process = identity_costtap[0]
    too_long = {"X-User-Id": "u" * 300}

    first = call(
        monkeypatch, identity_costtap, fake_openai_server, f"video:{TOKEN}", too_long, user="u-body"
    )
    second = call(
        monkeypatch, identity_costtap, fake_openai_server, f"video:{TOKEN}", too_long, user="u-body"
    )

    # The invalid header is skipped, never truncated: the next source gives the user.
    assert first["user"] == second["user"] == "u-body"
    assert (
        process.log().count(
            "user from header X-User-Id rejected (longer than 256 characters (300))"
        )
        == 1
    )
    assert "u" * 300 not in process.log()
    metrics = admin_get(process, "/metrics")[1]
    assert 'costtap_identity_rejected_total{app="video",field="user"} 2.0' in metrics

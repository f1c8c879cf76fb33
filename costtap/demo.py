"""`costtap demo`: a whole metering loop on loopback, with no API key and no network.

It starts a stand-in for OpenAI on 127.0.0.1 over TLS and runs `costtap run` in front of it
with `--upstream`. It sends three chat calls through the proxy as a service would, one of
them streamed without asking for usage, then prints the recorded events and the report.
Everything it starts stops before it returns, and its files live in a temporary directory.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import json
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from costtap.proxy.ca import ca_dir
from costtap.proxy.master import BUNDLE_FILE
from costtap.tracker.ledger import iter_events, open_for_reading
from costtap.tracker.report import TOTAL_COLUMNS, format_rows, spend_by

_LISTENING = re.compile(r"costtap proxy listening on \S+:(\d+)")
STARTUP_TIMEOUT = 30.0

# The demo's apps file: every call belongs to one app, and the user comes from the body.
_APPS = """\
default_app: demo-service
apps:
  - name: demo-service
    user:
      - body: user
"""

# The usage the stand-in reports for every call: gpt-4o-mini, 20 input and 12 output tokens.
MODEL = "gpt-4o-mini-2024-07-18"
USAGE = {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 that also serves as its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "costtap demo upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream.pem", directory / "upstream.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _StandIn:
    """A stand-in for OpenAI's chat completions, on its own event loop in a thread."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="demo-upstream", daemon=True
        )
        self._runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "chatcmpl-demo", "created": int(time.time()), "model": MODEL}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Metered by costtap."}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response(
                {**base, "object": "chat.completion", "choices": [choice], "usage": USAGE}
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        with_usage = (body.get("stream_options") or {}).get("include_usage") is True
        for word in ("Metered", " by", " costtap."):
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}}],
            }
            if with_usage:
                chunk["usage"] = None
            await response.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())
        if with_usage:
            last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
            await response.write(f"data: {json.dumps(last, separators=(',', ':'))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _call(proxy_port: int, bundle: Path, payload: dict[str, Any]) -> bytes:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", proxy_port, context=ssl.create_default_context(cafile=str(bundle)), timeout=30
    )
    connection.set_tunnel("api.openai.com", 443)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(payload),
            headers={
                "content-type": "application/json",
                "authorization": "Bearer sk-demo-not-a-key",
            },
        )
        response = connection.getresponse()
        return response.read()
    finally:
        connection.close()


def run_demo() -> int:
    """Run the demo, print what it shows, and return the exit status."""
    with tempfile.TemporaryDirectory(prefix="costtap-demo-") as directory:
        root = Path(directory)
        data_dir = root / "data"
        cert, key = _self_signed_cert(root)
        stand_in = _StandIn(cert, key)
        stand_in.start()
        log_path = root / "costtap.log"
        apps = root / "costtap.yaml"
        apps.write_text(_APPS)
        command = [
            sys.executable,
            "-m",
            "costtap",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--upstream",
            f"api.openai.com=https://127.0.0.1:{stand_in.port}",
            "--upstream-ca",
            str(cert),
            "--apps",
            str(apps),
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            port = _wait_for_port(process, log_path)
            bundle = ca_dir(data_dir) / BUNDLE_FILE
            print(
                f"costtap demo: proxy on 127.0.0.1:{port}, stand-in for api.openai.com on 127.0.0.1:{stand_in.port}\n"
            )
            calls: list[tuple[str, dict[str, Any]]] = [
                ("a chat completion for user ana", _payload(user="ana")),
                (
                    "a stream for user ana that did not ask for usage",
                    _payload(user="ana", stream=True),
                ),
                ("a chat completion for user bo", _payload(user="bo")),
            ]
            for label, payload in calls:
                body = _call(port, bundle, payload)
                usage_shown = (
                    "usage hidden from the client"
                    if b'"usage"' not in body
                    else "usage in the body"
                )
                print(f"  sent {label}: {len(body)} bytes back, {usage_shown}")
            _wait_for_events(data_dir, len(calls))
        finally:
            process.terminate()
            process.wait(timeout=30)
            stand_in.stop()
        with open_for_reading(data_dir) as connection:
            events = list(iter_events(connection))
            rows = spend_by(connection, ["app", "user", "model"])
        print("\ncosttap events --format json:")
        for event in events:
            print("  " + json.dumps(event))
        table = format_rows(rows, ["app", "user", "model", *TOTAL_COLUMNS], "table")
        print("\ncosttap report --by app,user,model:")
        print("  " + table.rstrip().replace("\n", "\n  "))
        print(
            "\nEach call was metered from the stand-in's reported usage and priced at gpt-4o-mini's list price."
        )
    return 0


def _payload(user: str, stream: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "What does costtap do?"}],
        "user": user,
    }
    if stream:
        payload["stream"] = True
    return payload


def _wait_for_port(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if match := _LISTENING.search(log_path.read_text(errors="replace")):
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(
                f"costtap exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.05)
    raise RuntimeError(f"costtap did not start within {STARTUP_TIMEOUT:.0f} s")


def _wait_for_events(data_dir: Path, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open_for_reading(data_dir) as connection:
                if len(list(iter_events(connection))) >= count:
                    return
        except Exception:  # the ledger may not exist yet
            pass
        time.sleep(0.05)

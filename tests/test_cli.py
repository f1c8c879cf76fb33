"""The command line as a user runs it: exit codes, messages, CA files, reports and events."""

from __future__ import annotations

import csv
import io
import json
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import certifi
import openai
import pytest
from genai_prices import Usage, calc_price

from tests.support.clients import route_clients_through
from tests.support.corpus import Case
from tests.support.costtap_process import (
    CosttapProcess,
    LedgerProbe,
    costtap_command,
    start_costtap,
    write_trust_bundle,
)
from tests.support.fake_upstream import FakeUpstream
from tests.support.openai_fake import chat_reply
from tests.support.pki import TestAuthority


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(costtap_command(*arguments), capture_output=True, text=True, timeout=60)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--listen", "localhost"], "--listen: invalid address 'localhost'"),
        (["run", "--admin", "127.0.0.1:99999"], "--admin: invalid address '127.0.0.1:99999'"),
        (["run", "--upstream", "api.openai.com"], "--upstream: invalid value 'api.openai.com'"),
        (
            ["run", "--upstream", "api.openai.com=ftp://127.0.0.1"],
            "--upstream: invalid URL 'ftp://127.0.0.1'",
        ),
        (
            ["run", "--upstream", "example.com=https://127.0.0.1:1"],
            "'example.com' is not a provider host",
        ),
        (
            ["run", "--upstream-ca", "/nonexistent/ca.pem"],
            "--upstream-ca: file '/nonexistent/ca.pem' not found",
        ),
        (["run", "--upstream-ca", __file__], "contains no usable PEM certificate"),
        (["report", "--by", "app,colour"], "--by: unknown dimension 'colour'"),
        (["report", "--since", "yesterday"], "--since: invalid date 'yesterday'"),
        (["events", "--limit", "0"], "invalid count '0'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_invalid_usage_exits_2(arguments: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli(*arguments)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("taken_flag", "free_flag", "where"),
    [("--listen", "--admin", ""), ("--admin", "--listen", " (--admin)")],
)
def test_run_port_in_use_exits_2(
    tmp_path: Path, taken_flag: str, free_flag: str, where: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_cli(
            "run",
            taken_flag,
            f"127.0.0.1:{port}",
            free_flag,
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path),
        )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr) == (
        f"costtap: cannot listen on 127.0.0.1:{port}{where}: address already in use; choose another address"
    )


def test_ca_prints_cert_and_writes_bundle(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    bundle = tmp_path / "bundle.pem"

    result = run_cli("ca", "--data-dir", str(data_dir), "--bundle", str(bundle))

    assert result.returncode == 0
    cert_path = Path(result.stdout.strip())
    assert cert_path == data_dir / "ca" / "mitmproxy-ca-cert.pem"
    cert = cert_path.read_text()
    assert "BEGIN CERTIFICATE" in cert
    bundle_text = bundle.read_text()
    assert bundle_text.startswith(Path(certifi.where()).read_text().rstrip("\n"))
    assert bundle_text.endswith(cert)
    key_mode = stat.S_IMODE((data_dir / "ca" / "mitmproxy-ca.pem").stat().st_mode)
    assert key_mode == 0o600


def test_ca_is_stable_across_runs(tmp_path: Path) -> None:
    first = run_cli("ca", "--data-dir", str(tmp_path))
    cert = Path(first.stdout.strip()).read_text()

    second = run_cli("ca", "--data-dir", str(tmp_path))

    assert Path(second.stdout.strip()).read_text() == cert


def test_report_without_ledger_exits_1(tmp_path: Path) -> None:
    result = run_cli("report", "--data-dir", str(tmp_path / "empty"))

    assert result.returncode == 1
    assert "no ledger at" in result.stderr


def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    process = CosttapProcess(tmp_path / "data").start()

    exit_code = process.stop()

    assert exit_code == 0
    assert "received SIGTERM, stopping" in process.log()
    assert "ledger closed" in process.log()


@pytest.fixture(scope="module")
def reports_data_dir(
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> Iterator[Path]:
    """A fresh costtap's data dir after two known calls through it."""
    data_dir = tmp_path_factory.mktemp("reports") / "data"
    process = start_costtap(data_dir, fake_openai_server.url, test_authority.cert_path)
    try:
        bundle = write_trust_bundle(process)
        with pytest.MonkeyPatch.context() as env:
            route_clients_through(env, process.proxy_url, bundle)
            client = openai.OpenAI(max_retries=0)
            probe = LedgerProbe(data_dir)
            for case in (TestReportsAfterCalls.BASIC, TestReportsAfterCalls.REASONING):
                fake_openai_server.responder = lambda received, case=case: chat_reply(
                    case, received
                )
                before = probe.request_ids()
                client.chat.completions.create(**case.request_body)
                probe.wait_for_new(before)
        yield data_dir
    finally:
        process.stop()


@pytest.mark.e2e
class TestReportsAfterCalls:
    """Two known calls through a fresh costtap, then `events` and `report` over its ledger."""

    BASIC = Case("openai", "chat-nonstream-gpt4o-basic")
    REASONING = Case("openai", "chat-nonstream-o3mini-reasoning")

    # genai-prices' own prices for the recorded units.
    @staticmethod
    def basic_cost() -> float:
        return float(
            calc_price(
                Usage(input_tokens=24, output_tokens=8), "gpt-4o-2024-08-06", provider_id="openai"
            ).total_price
        )

    @staticmethod
    def reasoning_cost() -> float:
        return float(
            calc_price(
                Usage(input_tokens=7, output_tokens=87), "o3-mini-2025-01-31", provider_id="openai"
            ).total_price
        )

    def test_events_json(self, reports_data_dir: Path) -> None:
        result = run_cli("events", "--data-dir", str(reports_data_dir), "--format", "json")

        assert result.returncode == 0
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert [event["model"] for event in events] == ["gpt-4o-2024-08-06", "o3-mini-2025-01-31"]
        basic, reasoning = events
        assert basic["units"] == {"input_tokens": 24, "output_tokens": 8}
        assert basic["cost_usd"] == pytest.approx(self.basic_cost(), rel=1e-12)
        assert reasoning["units"] == {
            "input_tokens": 7,
            "output_tokens": 87,
            "reasoning_tokens": 64,
        }
        assert reasoning["cost_usd"] == pytest.approx(self.reasoning_cost(), rel=1e-12)
        assert set(basic) == {
            "time", "request_id", "app", "user", "project", "job", "provider", "endpoint",
            "model", "units", "cost_usd", "latency_ms", "ttfb_ms", "status", "estimated",
        }  # fmt: skip
        assert basic["app"] == "default"
        assert basic["status"] == "success"
        assert basic["estimated"] is False
        assert basic["latency_ms"] >= basic["ttfb_ms"] >= 0

    def test_events_limit_keeps_newest(self, reports_data_dir: Path) -> None:
        result = run_cli("events", "--data-dir", str(reports_data_dir), "--limit", "1")

        [line] = result.stdout.splitlines()
        assert json.loads(line)["model"] == "o3-mini-2025-01-31"

    def test_events_since_future_is_empty(self, reports_data_dir: Path) -> None:
        result = run_cli("events", "--data-dir", str(reports_data_dir), "--since", "2999-01-01")

        assert result.returncode == 0
        assert result.stdout == ""

    def test_report_json(self, reports_data_dir: Path) -> None:
        result = run_cli("report", "--data-dir", str(reports_data_dir), "--format", "json")

        assert result.returncode == 0
        rows = json.loads(result.stdout)
        by_model = {row["model"]: row for row in rows}
        assert set(by_model) == {"gpt-4o-2024-08-06", "o3-mini-2025-01-31"}
        assert by_model["gpt-4o-2024-08-06"]["cost_usd"] == pytest.approx(
            self.basic_cost(), rel=1e-9
        )
        assert by_model["o3-mini-2025-01-31"]["cost_usd"] == pytest.approx(
            self.reasoning_cost(), rel=1e-9
        )
        assert all(row["app"] == "default" and row["calls"] == 1 for row in rows)

    def test_report_by_provider_csv(self, reports_data_dir: Path) -> None:
        result = run_cli(
            "report", "--data-dir", str(reports_data_dir), "--by", "provider", "--format", "csv"
        )

        [row] = list(csv.DictReader(io.StringIO(result.stdout)))
        assert row["provider"] == "openai"
        assert row["calls"] == "2"
        assert float(row["cost_usd"]) == pytest.approx(
            self.basic_cost() + self.reasoning_cost(), rel=1e-9
        )
        assert row["unpriced_calls"] == "0"

    def test_report_table(self, reports_data_dir: Path) -> None:
        result = run_cli("report", "--data-dir", str(reports_data_dir))

        header, *lines = result.stdout.splitlines()
        assert header.split() == [
            "app",
            "model",
            "calls",
            "cost_usd",
            "unpriced_calls",
            "estimated_calls",
        ]
        assert len(lines) == 2


def test_run_writes_bundle_at_start(tmp_path: Path) -> None:
    process = CosttapProcess(tmp_path / "data").start()
    process.stop()

    bundle = tmp_path / "data" / "ca" / "costtap-bundle.pem"
    assert f"CA bundle (public roots and costtap's CA) for SSL_CERT_FILE: {bundle}" in process.log()
    cert = (tmp_path / "data" / "ca" / "mitmproxy-ca-cert.pem").read_text()
    assert bundle.read_text().endswith(cert)


def test_demo_meters_three_calls() -> None:
    result = run_cli("demo")

    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert "a stream for user ana that did not ask for usage" in output
    assert "usage hidden from the client" in output
    events = [json.loads(line) for line in output.splitlines() if line.startswith('  {"time"')]
    assert [event["user"] for event in events] == ["ana", "ana", "bo"]
    assert all(event["units"] == {"input_tokens": 20, "output_tokens": 12} for event in events)
    # gpt-4o-mini: 20 input tokens at $0.15 and 12 output tokens at $0.60 per million.
    assert all(event["cost_usd"] == pytest.approx(20 * 0.15e-6 + 12 * 0.60e-6) for event in events)
    assert all(event["app"] == "demo-service" for event in events)

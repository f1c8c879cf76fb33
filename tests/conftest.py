"""Fixtures that run real parts: a costtap process, fake providers over TLS, SDK clients.

Everything listens on 127.0.0.1. Provider hosts are routed to the fakes with costtap's
`--upstream`, so no test ever resolves or dials a provider's real host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import route_clients_through
from tests.support.costtap_process import (
    CosttapProcess,
    LedgerProbe,
    start_costtap,
    write_trust_bundle,
)
from tests.support.fake_upstream import FakeUpstream, Reply, server_ssl_context
from tests.support.pki import ServerCert, TestAuthority


@pytest.fixture(scope="session")
def test_authority(tmp_path_factory: pytest.TempPathFactory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def upstream_cert(test_authority: TestAuthority) -> ServerCert:
    return test_authority.issue_server_cert("upstream")


@pytest.fixture(scope="session")
def fake_openai_server(upstream_cert: ServerCert) -> Iterator[FakeUpstream]:
    server = FakeUpstream(
        server_ssl_context(str(upstream_cert.cert_path), str(upstream_cert.key_path))
    ).start()
    yield server
    server.stop()


@pytest.fixture
def fake_openai(fake_openai_server: FakeUpstream) -> FakeUpstream:
    """The fake OpenAI upstream, with its script and request log reset for this test."""
    fake_openai_server.responder = lambda request: Reply(
        [b'{"error": "no reply scripted"}'], status=500
    )
    fake_openai_server.received.clear()
    fake_openai_server.second_chunk_times.clear()
    return fake_openai_server


@pytest.fixture(scope="session")
def costtap(
    tmp_path_factory: pytest.TempPathFactory,
    fake_openai_server: FakeUpstream,
    test_authority: TestAuthority,
) -> Iterator[CosttapProcess]:
    data_dir = tmp_path_factory.mktemp("costtap") / "data"
    process = start_costtap(data_dir, fake_openai_server.url, test_authority.cert_path)
    yield process
    exit_code = process.stop()
    assert exit_code == 0, process.log()


@pytest.fixture(scope="session")
def trust_bundle(costtap: CosttapProcess) -> Path:
    return write_trust_bundle(costtap)


@pytest.fixture
def ledger(costtap: CosttapProcess) -> LedgerProbe:
    return LedgerProbe(costtap.data_dir)


@pytest.fixture
def client_env(
    monkeypatch: pytest.MonkeyPatch, costtap: CosttapProcess, trust_bundle: Path
) -> CosttapProcess:
    """Configure SDK clients by environment alone, as a service would be configured."""
    route_clients_through(monkeypatch, costtap.proxy_url, trust_bundle)
    return costtap

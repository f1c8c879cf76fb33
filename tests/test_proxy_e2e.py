"""The proxy itself: tunneling of hosts no provider claims, and the metered call's path."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator

import pytest

from tests.support.clients import admin_get, metric_value
from tests.support.costtap_process import CosttapProcess, LedgerProbe
from tests.support.fake_upstream import FakeUpstream, Reply, server_ssl_context
from tests.support.pki import TestAuthority

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def other_authority(tmp_path_factory: pytest.TempPathFactory) -> TestAuthority:
    """A CA that is in neither costtap's trust list nor the trust bundle."""
    return TestAuthority(tmp_path_factory.mktemp("other-pki"), name="unrelated test CA")


@pytest.fixture(scope="module")
def unrelated_server(other_authority: TestAuthority) -> Iterator[FakeUpstream]:
    cert = other_authority.issue_server_cert("unrelated")
    server = FakeUpstream(server_ssl_context(str(cert.cert_path), str(cert.key_path))).start()
    server.responder = lambda request: Reply(
        [b"plain answer"], headers={"content-type": "text/plain"}
    )
    yield server
    server.stop()


def test_unclaimed_host_is_tunneled(
    costtap: CosttapProcess,
    ledger: LedgerProbe,
    unrelated_server: FakeUpstream,
    other_authority: TestAuthority,
) -> None:
    # The client trusts only the server's own CA: the handshake succeeds only if costtap
    # passes the TLS connection through instead of presenting its own certificate.
    context = ssl.create_default_context(cafile=str(other_authority.cert_path))
    connection = http.client.HTTPSConnection("127.0.0.1", costtap.port, context=context, timeout=10)
    connection.set_tunnel("127.0.0.1", unrelated_server.port)
    before = ledger.request_ids()

    connection.request("POST", "/v1/chat/completions", body=b'{"model": "gpt-4o"}')
    response = connection.getresponse()
    body = response.read()
    connection.close()

    assert response.status == 200
    assert body == b"plain answer"
    [received] = unrelated_server.received
    assert received.body == b'{"model": "gpt-4o"}'
    assert ledger.request_ids() == before


def test_provider_host_uses_costtap_certificate(
    costtap: CosttapProcess, trust_bundle: object
) -> None:
    context = ssl.create_default_context(
        cafile=str(costtap.data_dir / "ca" / "mitmproxy-ca-cert.pem")
    )
    connection = http.client.HTTPSConnection("127.0.0.1", costtap.port, context=context, timeout=10)
    connection.set_tunnel("api.openai.com", 443)

    connection.connect()
    assert connection.sock is not None
    peer = connection.sock.getpeercert()
    connection.close()

    issuer = dict(item[0] for item in peer["issuer"])
    assert issuer["commonName"] == "costtap CA"


def test_admin_endpoints(client_env: CosttapProcess, fake_openai: FakeUpstream) -> None:
    import json

    import openai

    from tests.support.corpus import Case
    from tests.support.openai_fake import chat_reply

    case = Case("openai", "chat-nonstream-gpt4o-basic")
    fake_openai.responder = lambda received: chat_reply(case, received)
    metric = 'costtap_calls_total{endpoint="chat.completions",provider="openai",status="success"}'

    before = metric_value(client_env, metric)
    openai.OpenAI(max_retries=0).chat.completions.create(**case.request_body)

    assert admin_get(client_env, "/healthz") == (200, '{"status": "ok"}')
    status, body = admin_get(client_env, "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready"}
    assert metric_value(client_env, metric) == before + 1

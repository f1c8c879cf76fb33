"""Measure the latency costtap adds to a small metered call, on loopback.

Run from the repository root: `python bench/latency.py [CALLS]` (default 300). It starts a
fake OpenAI upstream over TLS and a costtap in local mode, both on 127.0.0.1. It then times
the same chat completion sent directly to the fake and through costtap, over one kept-alive
connection each. It prints the median and 95th percentile of both and of the difference.
The calls through costtap include its preflight and the ledger commit that precedes the end
of each response.
"""

from __future__ import annotations

import http.client
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.corpus import Case
from tests.support.costtap_process import LedgerProbe, start_costtap, write_trust_bundle
from tests.support.fake_upstream import FakeUpstream, server_ssl_context
from tests.support.openai_fake import chat_reply
from tests.support.pki import TestAuthority

CASE = Case("openai", "chat-nonstream-gpt4o-basic")


def timed_calls(connection: http.client.HTTPSConnection, calls: int) -> list[float]:
    body = CASE.read(".request.json")
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    durations = []
    for _ in range(calls):
        start = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        durations.append((time.perf_counter() - start) * 1000)
        assert response.status == 200
    return durations


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        authority = TestAuthority(root / "pki")
        cert = authority.issue_server_cert("upstream")
        fake = FakeUpstream(server_ssl_context(str(cert.cert_path), str(cert.key_path))).start()
        fake.responder = lambda received: chat_reply(CASE, received)
        process = start_costtap(root / "data", fake.url, authority.cert_path)
        try:
            direct = http.client.HTTPSConnection(
                "127.0.0.1",
                fake.port,
                context=ssl.create_default_context(cafile=str(authority.cert_path)),
            )
            proxied = http.client.HTTPSConnection(
                "127.0.0.1",
                process.port,
                context=ssl.create_default_context(cafile=str(write_trust_bundle(process))),
            )
            proxied.set_tunnel("api.openai.com", 443)
            timed_calls(direct, 20)  # warm up both paths
            timed_calls(proxied, 20)
            direct_ms = timed_calls(direct, calls)
            proxied_ms = timed_calls(proxied, calls)
            recorded = len(LedgerProbe(process.data_dir).request_ids())
        finally:
            process.stop()
            fake.stop()
    added = [
        through - plain
        for through, plain in zip(sorted(proxied_ms), sorted(direct_ms), strict=True)
    ]
    print(f"{calls} calls each, {recorded} recorded in the ledger")
    print(
        f"direct:        p50 {statistics.median(direct_ms):6.2f} ms   p95 {percentile(direct_ms, 0.95):6.2f} ms"
    )
    print(
        f"through proxy: p50 {statistics.median(proxied_ms):6.2f} ms   p95 {percentile(proxied_ms, 0.95):6.2f} ms"
    )
    print(
        f"added:         p50 {statistics.median(added):6.2f} ms   p95 {percentile(added, 0.95):6.2f} ms"
    )


if __name__ == "__main__":
    main()

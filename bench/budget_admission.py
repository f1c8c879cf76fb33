"""Measure what a hard budget costs concurrent calls, far from its end and at its end.

Run from the repository root: `python bench/budget_admission.py [CALLS]` (default 200). It
starts a fake OpenAI upstream over TLS that completes each chat response after 100 ms. It
also starts a costtap in local mode with one hard budget, and both listen on 127.0.0.1.
Then it sends CALLS capped chat calls at once with the openai SDK, twice:

- against $100, where every call fits at its ceiling, so none waits;
- against $0.01, where the fake bills up to 98 input tokens more than the estimate, so calls
  wait for each other near the end and the ledger shows how far spend went past the budget.

For each run it prints the wall time, the median and 95th percentile of call latency, the
calls admitted, denied and held, and the recorded spend.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.clients import metric_value
from tests.support.costtap_process import CosttapProcess, LedgerProbe, write_trust_bundle
from tests.support.fake_upstream import FakeUpstream, ReceivedRequest, Reply, server_ssl_context
from tests.support.openai_fake import CAPPED_CHAT, json_reply, usage_completion
from tests.support.pki import TestAuthority

M = 1_000_000
# gpt-4o list price: $2.50 input and $10 output per million tokens.
MAX_UNDERESTIMATE_USD = 98 * 2.50 / M


async def send_at_once(calls: int) -> tuple[list[int], list[float]]:
    client = openai.AsyncOpenAI(max_retries=0, timeout=120)

    async def one() -> tuple[int, float]:
        start = time.perf_counter()
        try:
            await client.chat.completions.create(**CAPPED_CHAT)
            status = 200
        except openai.APIStatusError as error:
            status = error.status_code
        return status, (time.perf_counter() - start) * 1000

    results = await asyncio.gather(*(one() for _ in range(calls)))
    await client.close()
    return [status for status, _ in results], [duration for _, duration in results]


def run(
    root: Path, fake: FakeUpstream, authority: TestAuthority, budget: float, calls: int
) -> None:
    apps = root / f"apps-{budget}.yaml"
    apps.write_text(
        f"budgets:\n  - {{name: cap, scope: all, amount_usd: {budget}, hard: true, thresholds: [2.0]}}\n",
        encoding="utf-8",
    )
    data_dir = root / f"data-{budget}"
    arguments = ["--apps", str(apps), "--upstream", f"api.openai.com={fake.url}"]
    arguments += ["--upstream-ca", str(authority.cert_path)]
    process = CosttapProcess(data_dir, arguments).start()

    try:
        os.environ["HTTPS_PROXY"] = process.proxy_url
        os.environ["SSL_CERT_FILE"] = str(write_trust_bundle(process))
        os.environ["OPENAI_API_KEY"] = "sk-bench-not-a-real-key"
        started = time.perf_counter()
        statuses, durations = asyncio.run(send_at_once(calls))
        wall = time.perf_counter() - started

        held_calls = metric_value(process, 'costtap_budget_held_calls_total{app="default"}')
        deadline = time.monotonic() + 30
        while len(LedgerProbe(data_dir).request_ids()) < calls and time.monotonic() < deadline:
            time.sleep(0.1)
        probe = LedgerProbe(data_dir)
        spent = sum(row["cost_usd"] or 0.0 for row in probe.rows(probe.request_ids()))
    finally:
        process.stop()

    ordered = sorted(durations)
    print(f"budget ${budget}: {calls} calls at once, wall {wall:.2f} s")
    print(
        f"  latency p50 {statistics.median(ordered):.0f} ms, "
        f"p95 {ordered[int(0.95 * (len(ordered) - 1))]:.0f} ms"
    )
    print(
        f"  admitted {statuses.count(200)}, denied {statuses.count(402)}, "
        f"other {len(statuses) - statuses.count(200) - statuses.count(402)}, held {held_calls:.0f}"
    )
    print(
        f"  spent ${spent:.7f}, budget + largest underestimate "
        f"${budget + MAX_UNDERESTIMATE_USD:.7f}"
    )


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    answered = itertools.count()

    def reply(received: ReceivedRequest) -> Reply:
        # 17 input tokens are estimated, and the fake bills 17 to 115. The body's first byte
        # leaves at once and the rest after 100 ms, like a model's reply.
        body = usage_completion("gpt-4o-2024-08-06", 17 + 2 * (next(answered) % 50), 20)
        return json_reply(body, pause_after_first=0.1)

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        authority = TestAuthority(root / "pki")
        cert = authority.issue_server_cert("upstream")
        fake = FakeUpstream(server_ssl_context(str(cert.cert_path), str(cert.key_path))).start()
        fake.responder = reply
        try:
            run(root, fake, authority, 100.0, calls)
            run(root, fake, authority, 0.01, calls)
        finally:
            fake.stop()


if __name__ == "__main__":
    main()

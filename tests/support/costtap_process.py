"""Start and stop a real `costtap run` process, and read its ledger."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_LISTENING = re.compile(r"costtap proxy listening on (\S+):(\d+)")
_ADMIN = re.compile(r"admin endpoints on http://(\S+):(\d+)")

STARTUP_TIMEOUT = 30.0
EVENT_TIMEOUT = 15.0


def costtap_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "costtap", *arguments]


class _ServiceProcess:
    """A costtap subprocess whose output goes to a log file, stopped with SIGTERM."""

    name = "costtap"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def _launch(
        self, arguments: list[str], env: dict[str, str] | None, ready: re.Pattern[str]
    ) -> str:
        """Start the process; return its own output once `ready` appears in it."""
        # A restarted process appends to the same log; only its own lines are searched.
        offset = len(self.log())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                costtap_command(*arguments), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            output = self.log()[offset:]
            if ready.search(output):
                return output
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()}"
                )
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {STARTUP_TIMEOUT} s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def read_events(
    ledger_path: Path, query: str = "", parameters: Sequence[object] = ()
) -> list[dict[str, Any]]:
    """Return the ledger's events matching `query` (a WHERE clause), units decoded."""
    if not ledger_path.exists():
        return []
    with sqlite3.connect(ledger_path, timeout=10) as connection:
        connection.row_factory = sqlite3.Row
        sql = f"SELECT * FROM events {query} ORDER BY time"
        rows = [dict(row) for row in connection.execute(sql, list(parameters))]
    for row in rows:
        row["units"] = json.loads(row["units"])
    return rows


class CosttapProcess(_ServiceProcess):
    """A `costtap run` subprocess listening on a free loopback port."""

    def __init__(
        self, data_dir: Path, extra_arguments: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> None:
        super().__init__(data_dir.parent / f"{data_dir.name}-costtap.log")
        self.data_dir = data_dir
        self._extra_arguments = list(extra_arguments)
        # 0 picks a free port; a test that restarts costtap on the same port sets it.
        self.listen_port = 0
        self._env = env
        self.port = 0
        self.admin_port = 0

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CosttapProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        arguments = [
            "run",
            "--listen",
            f"127.0.0.1:{self.listen_port}",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
            *self._extra_arguments,
        ]
        output = self._launch(arguments, self._env, _LISTENING)
        listening = _LISTENING.search(output)
        admin = _ADMIN.search(output)
        assert listening is not None
        assert admin is not None, "the admin endpoints start before the proxy"
        self.port = int(listening.group(2))
        self.admin_port = int(admin.group(2))
        return self


class LedgerProbe:
    """Read the ledger of a running costtap, waiting for new rows to appear."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "ledger.db"

    def request_ids(self) -> set[str]:
        if not self.path.exists():
            return set()
        with sqlite3.connect(self.path, timeout=10) as connection:
            try:
                return {row[0] for row in connection.execute("SELECT request_id FROM events")}
            except sqlite3.OperationalError:
                return set()

    def rows(self, request_ids: set[str]) -> list[dict[str, Any]]:
        placeholders = ",".join("?" for _ in request_ids)
        return read_events(self.path, f"WHERE request_id IN ({placeholders})", list(request_ids))

    def wait_for_new(
        self, before: set[str], count: int = 1, timeout: float = EVENT_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Return the rows added since `before`, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            new = self.request_ids() - before
            if len(new) >= count:
                return self.rows(new)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} new ledger rows, found {len(new)} after {timeout} s"
                )
            time.sleep(0.05)


def start_costtap(
    data_dir: Path, upstream_url: str, upstream_ca: Path, hosts: Sequence[str] = ("api.openai.com",)
) -> CosttapProcess:
    """Start costtap with every host in `hosts` routed to the fake upstream at `upstream_url`."""
    arguments = [
        argument for host in hosts for argument in ("--upstream", f"{host}={upstream_url}")
    ]
    return CosttapProcess(data_dir, [*arguments, "--upstream-ca", str(upstream_ca)]).start()


def write_trust_bundle(process: CosttapProcess) -> Path:
    """Write the process's trust bundle with `costtap ca --bundle` and return its path."""
    bundle = process.data_dir.parent / f"{process.data_dir.name}-bundle.pem"
    subprocess.run(
        costtap_command("ca", "--data-dir", str(process.data_dir), "--bundle", str(bundle)),
        check=True,
        capture_output=True,
    )
    return bundle


_TRACKER_LISTENING = re.compile(r"costtap tracker listening on http://(\S+):(\d+)")


class TrackerProcess(_ServiceProcess):
    """A `costtap tracker serve` subprocess on a loopback port (a free one unless given)."""

    name = "tracker"

    def __init__(
        self, data_dir: Path, api_keys: Sequence[str], apps: Path | None = None, port: int = 0
    ) -> None:
        super().__init__(data_dir.parent / f"{data_dir.name}-tracker.log")
        self.data_dir = data_dir
        self.port = port
        self._api_keys = list(api_keys)
        self._apps = apps

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TrackerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        arguments = [
            "tracker",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
        ]
        if self._apps is not None:
            arguments += ["--apps", str(self._apps)]
        environment = {**os.environ, "COSTTAP_TRACKER_API_KEYS": ",".join(self._api_keys)}
        environment.pop("COSTTAP_APPS", None)
        output = self._launch(arguments, environment, _TRACKER_LISTENING)
        match = _TRACKER_LISTENING.search(output)
        assert match is not None
        self.port = int(match.group(2))
        return self

    def events(self) -> list[dict[str, Any]]:
        """Return every event in the tracker's ledger."""
        return read_events(self.data_dir / "ledger.db")

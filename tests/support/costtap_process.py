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


class CosttapProcess:
    """A `costtap run` subprocess listening on a free loopback port."""

    def __init__(
        self, data_dir: Path, extra_arguments: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}-costtap.log"
        self._extra_arguments = list(extra_arguments)
        # 0 picks a free port; a test that restarts costtap on the same port sets it.
        self.listen_port = 0
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None
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
        # A restarted process appends to the same log; only its own lines are searched.
        offset = len(self.log())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                costtap_command(*arguments), stdout=log, stderr=subprocess.STDOUT, env=self._env
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            output = self.log()[offset:]
            if match := _LISTENING.search(output):
                self.port = int(match.group(2))
                admin = _ADMIN.search(output)
                assert admin is not None, "the admin endpoints start before the proxy"
                self.admin_port = int(admin.group(2))
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"costtap exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"costtap did not start within {STARTUP_TIMEOUT} s:\n{self.log()}")

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
        with sqlite3.connect(self.path, timeout=10) as connection:
            connection.row_factory = sqlite3.Row
            placeholders = ",".join("?" for _ in request_ids)
            query = f"SELECT * FROM events WHERE request_id IN ({placeholders}) ORDER BY time"
            rows = [dict(row) for row in connection.execute(query, list(request_ids))]
        for row in rows:
            row["units"] = json.loads(row["units"])
        return rows

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


class TrackerProcess:
    """A `costtap tracker serve` subprocess on a loopback port (a free one unless given)."""

    def __init__(
        self, data_dir: Path, api_keys: Sequence[str], apps: Path | None = None, port: int = 0
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}-tracker.log"
        self.port = port
        self._api_keys = list(api_keys)
        self._apps = apps
        self.process: subprocess.Popen[bytes] | None = None

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
        offset = len(self.log())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                costtap_command(*arguments), stdout=log, stderr=subprocess.STDOUT, env=environment
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if match := _TRACKER_LISTENING.search(self.log()[offset:]):
                self.port = int(match.group(2))
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"tracker exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"tracker did not start within {STARTUP_TIMEOUT} s:\n{self.log()}")

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

    def events(self) -> list[dict[str, Any]]:
        """Return every event in the tracker's ledger."""
        path = self.data_dir / "ledger.db"
        if not path.exists():
            return []
        with sqlite3.connect(path, timeout=10) as connection:
            connection.row_factory = sqlite3.Row
            rows = [dict(row) for row in connection.execute("SELECT * FROM events ORDER BY time")]
        for row in rows:
            row["units"] = json.loads(row["units"])
        return rows

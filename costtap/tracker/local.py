"""Local mode: events are priced and written to the embedded ledger by one writer thread.

The proxy's hooks hand events over with `submit`, which never blocks, so a slow disk never
delays what a client receives. The writer thread owns the SQLite connection.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from costtap.tracker.events import UsageEvent
from costtap.tracker.ledger import Ledger, LedgerError
from costtap.tracker.pricing import Pricer

logger = logging.getLogger(__name__)

_STOP = object()


class LocalRecorder:
    """Write events to the ledger in `data_dir` from a background thread."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._queue: queue.Queue[object] = queue.Queue()
        self._pricer = Pricer()
        self._thread: threading.Thread | None = None
        self._opened = threading.Event()
        self._open_error: LedgerError | None = None
        self.written = 0
        self.failed = 0

    def start(self) -> None:
        """Open the ledger in the writer thread; raise LedgerError when it cannot be opened."""
        self._thread = threading.Thread(target=self._run, name="costtap-ledger", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, event: UsageEvent) -> None:
        self._queue.put(event)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then close the ledger."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error(
                "ledger writer did not finish within %.0f s; %d events may be lost",
                timeout,
                self._queue.qsize(),
            )

    def _run(self) -> None:
        try:
            ledger = Ledger.in_dir(self._data_dir)
        except LedgerError as error:
            self._open_error = error
            self._opened.set()
            return
        self._opened.set()
        logger.info("ledger open at %s", ledger.path)
        try:
            while (item := self._queue.get()) is not _STOP:
                assert isinstance(item, UsageEvent)
                self._write(ledger, item)
        finally:
            ledger.close()
            logger.info(
                "ledger closed after %d events written, %d failed", self.written, self.failed
            )

    def _write(self, ledger: Ledger, event: UsageEvent) -> None:
        cost = self._pricer.price(event.provider, event.model, event.units, event.time)
        try:
            ledger.insert(event, cost)
        except LedgerError as error:
            # NOTE: a failed write is logged, not retried; the durable outbox will keep it.
            self.failed += 1
            logger.error("[%s app=%s] %s", event.request_id, event.app, error)
            return
        self.written += 1
        logger.debug(
            "[%s app=%s] recorded %s %s units=%s cost_usd=%s",
            event.request_id,
            event.app,
            event.endpoint,
            event.model,
            event.units.to_dict(),
            cost,
        )

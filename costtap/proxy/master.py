"""Run mitmproxy embedded in the costtap process, with costtap's addons and options.

Only provider hosts are decrypted; every other CONNECT becomes an opaque tunnel. The master
is a plain mitmproxy `Master` with the default addons, so start-up failures reach costtap as
log records instead of mitmproxy's own `sys.exit`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

from mitmproxy import addons, ctx, options
from mitmproxy.master import Master

from costtap.addons.admin import AdminServer, Metrics
from costtap.addons.identify import Identify
from costtap.addons.metering import Metering
from costtap.addons.proxyauth import ProxyCredentials
from costtap.addons.upstream import UpstreamOverride
from costtap.addons.websockets import WebSocketMetering
from costtap.config.settings import RunSettings
from costtap.config.store import AppsStore
from costtap.providers import intercepted_host_patterns
from costtap.proxy.ca import ca_dir, write_bundle
from costtap.proxy.hosts import allow_hosts_patterns
from costtap.tracker.base import Tracker
from costtap.tracker.local import LocalTracker

logger = logging.getLogger(__name__)

# Written into the CA directory at every start, for services' SSL_CERT_FILE.
BUNDLE_FILE = "costtap-bundle.pem"


class StartupError(Exception):
    """The proxy could not start, for example because its port is taken."""


class _StartupErrors(logging.Handler):
    """Collect error records that mitmproxy logs while its servers start."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class _Startup:
    """Addon that reports the listening address once mitmproxy's servers are up."""

    errors: _StartupErrors
    settings: RunSettings
    bundle: str
    failure: str | None = None
    listening: bool = False

    def running(self) -> None:
        _quiet_bind_errors(False, self.errors)
        proxyserver = ctx.master.addons.get("proxyserver")
        addresses = proxyserver.listen_addrs() if proxyserver is not None else []
        if self.errors.messages or not addresses:
            reason = (
                _short_reason(self.errors.messages[0])
                if self.errors.messages
                else "no listening socket"
            )
            self.failure = f"cannot listen on {self.settings.listen_address}: {reason}"
            ctx.master.shutdown()
            return
        host, port = addresses[0][0], addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        self.listening = True
        logger.info("costtap proxy listening on %s:%d", shown_host, port)
        logger.info("CA bundle (public roots and costtap's CA) for SSL_CERT_FILE: %s", self.bundle)
        logger.info("point services at it with HTTPS_PROXY=http://%s:%d", shown_host, port)


def _quiet_bind_errors(quiet: bool, errors: logging.Handler) -> None:
    """Keep mitmproxy's own bind error, which suggests mitmproxy flags, out of costtap's log.

    costtap reports the failure itself in one line, so while starting, the proxy server's
    records go to the collecting handler only.
    """
    proxyserver_logger = logging.getLogger("mitmproxy.addons.proxyserver")
    proxyserver_logger.propagate = not quiet
    if quiet:
        proxyserver_logger.addHandler(errors)
    else:
        proxyserver_logger.removeHandler(errors)


def _short_reason(message: str) -> str:
    """Reduce mitmproxy's multi-line bind error to its cause, e.g. "address already in use"."""
    first_line = message.splitlines()[0] if message else message
    if "error while attempting to bind" in first_line:
        return first_line.rsplit(": ", 1)[-1]
    return first_line


def proxy_options(settings: RunSettings) -> dict[str, Any]:
    """Return the mitmproxy option values costtap runs with."""
    listen = settings.listen_address
    values: dict[str, Any] = {
        "listen_host": listen.host,
        "listen_port": listen.port,
        "confdir": str(ca_dir(settings.data_dir)),
        # Dial upstream only when a request arrives, after costtap may have rewritten it.
        "connection_strategy": "lazy",
        "upstream_cert": False,
        "allow_hosts": allow_hosts_patterns(intercepted_host_patterns()),
        # costtap's tap observes streamed bodies; keeping copies would cost memory.
        "store_streamed_bodies": False,
        # These options sign with a publicly known CA key; they must stay off.
        "emudhra": False,
        "emudhra_old": False,
    }
    if settings.upstream_ca is not None:
        values["ssl_verify_upstream_trusted_ca"] = str(settings.upstream_ca)
    return values


async def run_proxy(settings: RunSettings, store: AppsStore, tracker: Tracker) -> None:
    """Serve until SIGINT or SIGTERM; raise StartupError when the proxy cannot start.

    Raises TrackerError when the tracker's storage cannot be opened.
    """
    bundle = write_bundle(settings.data_dir, ca_dir(settings.data_dir) / BUNDLE_FILE)
    startup = _Startup(_StartupErrors(), settings, str(bundle))
    metrics = Metrics()
    if isinstance(tracker, LocalTracker):
        tracker.on_unpriced = lambda provider, model: metrics.unpriced.labels(
            provider=provider, model=model
        ).inc()
        tracker.on_held = lambda app: metrics.budget_held.labels(app=app).inc()
    await tracker.start()
    # Read at every scrape, so the gauge is current whether or not /readyz was asked.
    metrics.outbox_pending.set_function(tracker.pending_records)

    def readiness() -> str | None:
        if not startup.listening:
            return "proxy not listening"
        return tracker.readiness()

    admin = AdminServer(settings.admin_address, metrics, readiness)
    try:
        await admin.start()
    except OSError as error:
        await tracker.stop(flush_seconds=0)
        reason = _short_reason(str(error))
        raise StartupError(
            f"cannot listen on {settings.admin_address} (--admin): {reason}"
        ) from error

    master = Master(options.Options())
    master.addons.add(*addons.default_addons())
    metering = Metering(tracker, store, metrics)
    # Order matters: credentials before identity, identity before metering, and the
    # upstream rewrite after metering has classified the call by its original host.
    master.addons.add(
        ProxyCredentials(store),
        Identify(store, metrics),
        metering,
        WebSocketMetering(tracker, store, metrics),
        UpstreamOverride(settings.upstreams),
        startup,
    )
    # Addon options exist only once the addons that declare them are loaded.
    master.options.update(**proxy_options(settings))

    stopper = _GracefulStop(master, metering, tracker, settings.stop_timeout)
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopper.request, signal_number)
    loop.add_signal_handler(signal.SIGHUP, store.reload, "SIGHUP")
    watcher = asyncio.create_task(store.watch(), name="apps-file-watcher")
    logging.getLogger("mitmproxy").addHandler(startup.errors)
    _quiet_bind_errors(True, startup.errors)
    try:
        await master.run()
        # Connections still open at stop are cancelled when the loop closes; asyncio would log
        # each cancellation as an error although nothing went wrong.
        loop.set_exception_handler(_ignore_cancelled_connections)
    finally:
        watcher.cancel()
        for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signal_number)
        logging.getLogger("mitmproxy").removeHandler(startup.errors)
        _quiet_bind_errors(False, startup.errors)
        startup.listening = False
        await admin.stop()
        await tracker.stop(flush_seconds=0 if startup.failure else settings.flush_timeout)
    if startup.failure is not None:
        raise StartupError(startup.failure)
    logger.info("costtap proxy stopped")


class _GracefulStop:
    """Stop accepting connections, let calls in progress finish, then stop mitmproxy.

    Calls waiting for admission are denied at once. A second signal, or the deadline, stops
    at once, and calls still open then are recorded as cancelled.
    """

    def __init__(
        self, master: Master, metering: Metering, tracker: Tracker, timeout: float
    ) -> None:
        self._master = master
        self._metering = metering
        self._tracker = tracker
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def request(self, signal_number: int) -> None:
        name = signal.Signals(signal_number).name
        if self._task is not None:
            logger.info("received %s again, stopping now", name)
            self._master.shutdown()
            return
        logger.info("received %s, stopping: waiting up to %g s for open calls", name, self._timeout)
        self._task = asyncio.create_task(self._stop(), name="costtap-graceful-stop")

    async def _stop(self) -> None:
        proxyserver = self._master.addons.get("proxyserver")
        if proxyserver is not None:
            await proxyserver.servers.update([])
        self._tracker.stop_admitting()
        deadline = asyncio.get_running_loop().time() + self._timeout
        while self._metering.open_calls and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self._metering.open_calls:
            logger.warning("calls still open at the stop deadline: %d", self._metering.open_calls)
        self._master.shutdown()


def _ignore_cancelled_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)

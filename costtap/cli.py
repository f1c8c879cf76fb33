"""The `costtap` command line.

Exit status: 0 success, 1 runtime failure, 2 invalid usage or configuration, each failure
with a one-line message that names the bad value and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from costtap import __version__
from costtap.config.apps import AppsFileError, LoadedApps, empty_apps, load_apps
from costtap.config.settings import (
    DEFAULT_APP,
    DEFAULT_DATA_DIR,
    ConfigError,
    load_run_settings,
    parse_address,
)
from costtap.config.store import AppsStore
from costtap.tracker.events import format_time
from costtap.tracker.ledger import LedgerError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_TRACKER_LISTEN = "127.0.0.1:8787"

logger = logging.getLogger("costtap")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _data_dir_default() -> Path:
    return Path(os.environ.get("COSTTAP_DATA_DIR") or DEFAULT_DATA_DIR)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        default=None,
        help="data directory (default ./costtap-data)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="costtap", description="Meter the AI traffic of services through a forward proxy."
    )
    parser.add_argument("--version", action="version", version=f"costtap {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = commands.add_parser("run", help="run the metering proxy with its embedded ledger")
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="proxy address (default 127.0.0.1:8080; port 0 picks one)",
    )
    run.add_argument(
        "--admin", metavar="HOST:PORT", help="admin endpoints address (default 127.0.0.1:9090)"
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="CA files, ledger and outbox (default ./costtap-data)",
    )
    run.add_argument(
        "--apps", type=Path, metavar="FILE", help="apps YAML file (default costtap.yaml)"
    )
    run.add_argument(
        "--upstream",
        action="append",
        metavar="HOST=URL",
        help=(
            "send a provider host's traffic to another base URL, "
            "e.g. api.openai.com=https://127.0.0.1:8443; repeatable"
        ),
    )
    run.add_argument(
        "--upstream-ca",
        type=Path,
        metavar="FILE",
        help="CA file that --upstream servers' certificates chain to",
    )
    run.set_defaults(handler=_run)

    ca = commands.add_parser(
        "ca", help="print the CA certificate path; optionally write a trust bundle"
    )
    _add_data_dir(ca)
    ca.add_argument(
        "--bundle",
        type=Path,
        metavar="FILE",
        help="write the public roots followed by costtap's CA to FILE",
    )
    ca.set_defaults(handler=_ca)

    report = commands.add_parser(
        "report", help="spend grouped by app and model, or by --by dimensions"
    )
    _add_data_dir(report)
    report.add_argument(
        "--by",
        default="app,model",
        metavar="LIST",
        help="comma-separated: app,user,project,model,provider,day (default app,model)",
    )
    report.add_argument(
        "--since",
        metavar="DATE",
        help="only calls at or after DATE (YYYY-MM-DD or ISO 8601 time, UTC)",
    )
    report.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (default table)",
    )
    report.set_defaults(handler=_report)

    events = commands.add_parser("events", help="print metered calls, one per line")
    _add_data_dir(events)
    events.add_argument(
        "--since",
        metavar="DATE",
        help="only calls at or after DATE (YYYY-MM-DD or ISO 8601 time, UTC)",
    )
    events.add_argument("--limit", type=_positive_int, metavar="N", help="only the newest N calls")
    events.add_argument(
        "--format",
        choices=("json", "csv"),
        default="json",
        help="json: one object a line (default); csv",
    )
    events.set_defaults(handler=_events)

    check = commands.add_parser(
        "check-config",
        help="validate the apps file and print the effective settings, secrets hidden",
    )
    check.add_argument(
        "--apps", type=Path, metavar="FILE", help="apps YAML file (default costtap.yaml)"
    )
    check.set_defaults(handler=_check_config)

    budgets = commands.add_parser(
        "budgets", help="spent, reserved and remaining of each budget in its current window"
    )
    _add_data_dir(budgets)
    budgets.add_argument(
        "--apps",
        type=Path,
        metavar="FILE",
        help="apps YAML file with the budgets (default costtap.yaml)",
    )
    budgets.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (default table)",
    )
    budgets.set_defaults(handler=_budgets)

    tracker = commands.add_parser("tracker", help="run the cost-tracker API over the local ledger")
    tracker_commands = tracker.add_subparsers(
        dest="tracker_command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    serve = tracker_commands.add_parser(
        "serve",
        help="serve /preflight, /usage/record and upserts; keys from COSTTAP_TRACKER_API_KEYS",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=None,
        help=f"address (default {DEFAULT_TRACKER_LISTEN})",
    )
    _add_data_dir(serve)
    serve.add_argument(
        "--apps",
        type=Path,
        metavar="FILE",
        help="apps YAML file with budgets (default costtap.yaml)",
    )
    serve.set_defaults(handler=_tracker_serve)

    outbox = commands.add_parser(
        "outbox", help="inspect, retry or deliver the records waiting for the tracker"
    )
    outbox.add_argument(
        "action",
        choices=("status", "retry", "drain"),
        help="status: counts; retry: dead letters back to pending; drain: deliver now",
    )
    _add_data_dir(outbox)
    outbox.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="drain: how long to try (default 30)",
    )
    outbox.set_defaults(handler=_outbox)

    demo = commands.add_parser(
        "demo", help="meter three calls to a local stand-in for OpenAI and show the ledger"
    )
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"costtap: {error}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerError as error:
        # Reading commands report a missing or unreadable ledger the same way.
        print(f"costtap: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader of our output went away (`costtap events | head`): not an error.
        return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from costtap.config.tracker import load_tracker_settings
    from costtap.proxy.master import StartupError, run_proxy
    from costtap.tracker.base import Tracker, TrackerError
    from costtap.tracker.local import LocalTracker
    from costtap.tracker.remote import RemoteTracker

    settings = load_run_settings(
        listen=args.listen,
        admin=args.admin,
        data_dir=args.data_dir,
        apps=args.apps,
        upstream=args.upstream,
        upstream_ca=args.upstream_ca,
    )
    tracker_settings = load_tracker_settings(dict(os.environ))
    logger.info(
        "costtap %s starting: data dir %s, %s, upstream overrides %s",
        __version__,
        settings.data_dir.resolve(),
        f"remote tracker {tracker_settings.base_url}" if tracker_settings else "embedded ledger",
        ", ".join(
            f"{host}={u.scheme}://{u.host}:{u.port}{u.path_prefix}"
            for host, u in settings.upstreams.items()
        )
        or "none",
    )
    apps_given = args.apps is not None or "COSTTAP_APPS" in os.environ
    store = AppsStore(load_apps_setting(settings.apps, settings.source_app, required=apps_given))
    apps = store.current
    if apps.path is None:
        logger.info(
            "no apps file at %s: every call is recorded under app %r",
            settings.apps,
            apps.default_app,
        )
    else:
        logger.info(
            "apps file %s: %d apps, %s, default app %r, proxy authentication %s",
            apps.path,
            len(apps.config.apps),
            "budgets are the tracker's"
            if tracker_settings
            else f"{len(apps.config.budgets)} budgets",
            apps.default_app,
            "required" if apps.config.require_proxy_auth else "optional",
        )
    tracker: Tracker
    if tracker_settings is not None:
        tracker = RemoteTracker(tracker_settings, settings.data_dir)
    else:
        tracker = LocalTracker(settings.data_dir, store)
    try:
        asyncio.run(run_proxy(settings, store, tracker))
    except StartupError as error:
        print(f"costtap: {error}; choose another address", file=sys.stderr)
        return EXIT_USAGE
    except TrackerError as error:
        print(f"costtap: {error}; check that --data-dir is writable", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _ca(args: argparse.Namespace) -> int:
    from costtap.proxy.ca import ensure_ca, write_bundle

    data_dir = args.data_dir or _data_dir_default()
    try:
        cert = ensure_ca(data_dir)
        if args.bundle is not None:
            write_bundle(data_dir, args.bundle)
            print(
                f"wrote trust bundle {args.bundle}: set SSL_CERT_FILE or REQUESTS_CA_BUNDLE to it",
                file=sys.stderr,
            )
    except OSError as error:
        print(f"costtap: cannot write CA files: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(cert)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from costtap.tracker.ledger import open_for_reading
    from costtap.tracker.report import TOTAL_COLUMNS, format_rows, parse_dimensions, spend_by

    try:
        dimensions = parse_dimensions(args.by)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    since = _parse_since(args.since)
    with open_for_reading(args.data_dir or _data_dir_default()) as connection:
        rows = spend_by(connection, dimensions, since)
    sys.stdout.write(format_rows(rows, [*dimensions, *TOTAL_COLUMNS], args.format))
    return EXIT_OK


def _events(args: argparse.Namespace) -> int:
    import csv

    from costtap.tracker.ledger import iter_events, open_for_reading

    since = _parse_since(args.since)
    with open_for_reading(args.data_dir or _data_dir_default()) as connection:
        events = list(iter_events(connection, since, args.limit))
    if args.format == "json":
        for event in events:
            sys.stdout.write(json.dumps(event) + "\n")
        return EXIT_OK
    columns = list(events[0]) if events else ["time", "request_id"]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for event in events:
        writer.writerow({**event, "units": json.dumps(event["units"], sort_keys=True)})
    return EXIT_OK


def load_apps_setting(
    path: Path, default_app: str, required: bool, resolve_tokens: bool = True
) -> LoadedApps:
    """Load the apps file; a missing file is an error only when it was named explicitly."""
    if not path.exists() and not required:
        return empty_apps(default_app)
    try:
        return load_apps(path, default_app, resolve_tokens=resolve_tokens)
    except AppsFileError as error:
        raise ConfigError(f"{error}") from error


def _apps_from_args(
    args: argparse.Namespace, required: bool = False, resolve_tokens: bool = True
) -> tuple[Path, LoadedApps]:
    """Load the apps file of --apps, else COSTTAP_APPS, else ./costtap.yaml.

    A file named by the flag or the variable must exist; the default one may be missing.
    """
    given = args.apps is not None or "COSTTAP_APPS" in os.environ
    path = args.apps or Path(os.environ.get("COSTTAP_APPS") or "costtap.yaml")
    default_app = os.environ.get("COST_TRACKER_SOURCE_APP") or DEFAULT_APP
    return path, load_apps_setting(
        path, default_app, required=required or given, resolve_tokens=resolve_tokens
    )


def _check_config(args: argparse.Namespace) -> int:
    from costtap.config.apps import describe

    path, apps = _apps_from_args(args, required=True)
    print(json.dumps(describe(apps), indent=2))
    print(f"costtap: {path} is valid: {len(apps.config.apps)} apps", file=sys.stderr)
    return EXIT_OK


def _budgets(args: argparse.Namespace) -> int:
    from costtap.tracker.budgets import all_statuses
    from costtap.tracker.ledger import open_for_reading
    from costtap.tracker.report import BUDGET_COLUMNS, budget_rows, format_rows

    apps_path, apps = _apps_from_args(args, resolve_tokens=False)
    if not apps.config.budgets:
        print(f"costtap: {apps_path} sets no budgets; add a `budgets:` section", file=sys.stderr)
        return EXIT_FAILURE
    with open_for_reading(args.data_dir or _data_dir_default()) as connection:
        statuses = all_statuses(connection, apps.config.budgets, datetime.now(UTC))
    sys.stdout.write(format_rows(budget_rows(statuses), list(BUDGET_COLUMNS), args.format))
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from costtap.demo import run_demo

    try:
        return run_demo()
    except (OSError, RuntimeError) as error:
        print(f"costtap: demo failed: {error}", file=sys.stderr)
        return EXIT_FAILURE


def _tracker_serve(args: argparse.Namespace) -> int:
    from costtap.tracker.base import TrackerError
    from costtap.tracker.local import LocalTracker
    from costtap.tracker.server import run_tracker_server

    listen = parse_address(
        args.listen or os.environ.get("COSTTAP_TRACKER_LISTEN") or DEFAULT_TRACKER_LISTEN,
        "--listen",
    )
    data_dir = args.data_dir or _data_dir_default()
    keys = [
        key.strip()
        for key in os.environ.get("COSTTAP_TRACKER_API_KEYS", "").split(",")
        if key.strip()
    ]
    if not keys:
        raise ConfigError(
            "COSTTAP_TRACKER_API_KEYS is empty: set it to the comma-separated API keys that may use this tracker"
        )
    store = AppsStore(_apps_from_args(args, resolve_tokens=False)[1])
    # A held preflight returns within a second, inside the proxy's preflight timeout.
    tracker = LocalTracker(data_dir, store, price_estimates=True, admission_wait=1.0)
    try:
        asyncio.run(run_tracker_server(listen, tracker, store, keys))
    except OSError as error:
        print(
            f"costtap: cannot listen on {listen}: {error.strerror or error}; choose another address",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except TrackerError as error:
        print(f"costtap: {error}; check that --data-dir is writable", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _outbox(args: argparse.Namespace) -> int:
    from costtap.tracker.outbox import Outbox, OutboxError

    data_dir = args.data_dir or _data_dir_default()
    if not (data_dir / "outbox.db").exists():
        print(
            f"costtap: no outbox at {data_dir / 'outbox.db'}: remote mode has not run with this --data-dir",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.action == "drain":
        return _drain_outbox(data_dir, args.timeout)
    try:
        outbox = Outbox.in_dir(data_dir)
        if args.action == "retry":
            moved, due = outbox.retry_all()
            print(f"{moved} dead letters moved back to pending; {due} pending records due now")
            return EXIT_OK
        status = outbox.status()
        dead = outbox.dead_letters()
    except OutboxError as error:
        print(f"costtap: {error}", file=sys.stderr)
        return EXIT_FAILURE
    age = (
        f"{status.oldest_pending_age_seconds:.0f} s"
        if status.oldest_pending_age_seconds is not None
        else "-"
    )
    print(f"pending: {status.pending}")
    print(f"dead letters: {status.dead}")
    print(f"oldest pending: {age}")
    print(f"last error: {status.last_error or '-'}")
    for request_id, reason in dead:
        print(f"dead letter {request_id}: {reason}")
    return EXIT_OK


def _drain_outbox(data_dir: Path, timeout: float) -> int:
    from costtap.config.tracker import load_tracker_settings
    from costtap.tracker.remote import RemoteTracker

    settings = load_tracker_settings(dict(os.environ))
    if settings is None:
        raise ConfigError("outbox drain needs COST_TRACKER_BASE_URL and COST_TRACKER_API_KEY")

    async def drain() -> tuple[int, int]:
        tracker = RemoteTracker(settings, data_dir)
        await tracker.start()
        await tracker.stop(flush_seconds=timeout)
        return tracker.delivered, tracker.pending_records()

    delivered, left = asyncio.run(drain())
    if left:
        print(
            f"costtap: {delivered} records delivered, {left} still pending after {timeout:.0f} s; "
            "see `costtap outbox status`",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(f"outbox drained: {delivered} records delivered, none pending")
    return EXIT_OK


def _parse_since(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise ConfigError(
            f"--since: invalid date {value!r}, expected YYYY-MM-DD or an ISO 8601 time"
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_time(moment)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid count {value!r}, expected a whole number of 1 or more"
        )
    return int(value)


def _configure_logging() -> None:
    level_name = os.environ.get("COSTTAP_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # mitmproxy logs every client connection at INFO; costtap logs what an operator needs.
    logging.getLogger("mitmproxy").setLevel(max(level, logging.WARNING))

"""The ``tollgate`` command: serve, migrate, dev-wallet, reconcile, mock-upstream."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app.config.catalog import CatalogError, load_catalog
from app.config.settings import DEFAULT_PORT, SettingsError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate", description="Pay-per-request metered LLM proxy with wallet billing."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy (embedded defaults when unset)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT}; 0 = any)")
    serve.add_argument("--state-dir", type=Path, help="embedded servers' data (default .tollgate)")
    serve.add_argument("--catalog", type=Path, help="catalog TOML (default: the sample catalog)")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port")

    migrate = commands.add_parser("migrate", help="apply database migrations (DATABASE_URL)")
    migrate.add_argument("--state-dir", type=Path,
                         help="migrate the embedded database of this state dir instead")

    wallet = commands.add_parser(
        "dev-wallet",
        help="a dev wallet (funded on serve's dev chain) and a session token for a running Tollgate"
    )
    wallet.add_argument("--url", help="Tollgate's URL (default http://TOLLGATE_HOST:PORT)")
    wallet.add_argument("--state-dir", type=Path,
                        help="where the dev wallet's keys are kept and serve's dev chain is found")
    wallet.add_argument("--json", action="store_true", help="machine-readable output")
    wallet.add_argument("--token", action="store_true", help="print only the session token")

    reconcile = commands.add_parser(
        "reconcile", help="match the ledger with the chain and check its invariants (exit 1: no)")
    reconcile.add_argument("--state-dir", type=Path,
                           help="use this state dir's embedded database and dev chain")
    output = reconcile.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the report as JSON")
    output.add_argument("--csv", action="store_true", help="the report as CSV")
    reconcile.add_argument("--from-block", type=int,
                           help="first block to read (default: the settlement's deployment)")
    reconcile.add_argument("--to-block", type=int, help="last block to read (default: latest)")

    commands.add_parser("settle", help="one settlement pass (DATABASE_URL, a configured chain"
                        " and the operator key); exit 1 if a collection failed")

    mock = commands.add_parser("mock-upstream", help="run the mock OpenAI-compatible upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8401)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "dev-wallet":
            return _dev_wallet(args)
        if args.command == "reconcile":
            from app.reconcile.command import run_reconcile

            return run_reconcile(args)
        if args.command == "settle":
            from app.settlement.command import run_settle

            return run_settle(load_settings())
        if args.command == "mock-upstream":
            from app.devstack.mock_upstream import run_mock_upstream

            run_mock_upstream(args.host, args.port)
            return 0
    except (SettingsError, CatalogError) as error:
        print(f"tollgate: {error}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


def _serve(args: argparse.Namespace) -> int:
    from app.serve import configure_logging, run_serve

    settings = load_settings(
        host=args.host, port=args.port, state_dir=args.state_dir,
        catalog=args.catalog, workers=args.workers,
    )
    configure_logging(settings.log_level)
    catalog = load_catalog(settings.catalog)
    return run_serve(settings, catalog)


def _dev_wallet(args: argparse.Namespace) -> int:
    import asyncio
    import json

    import aiohttp

    from app.chain.errors import ChainError
    from app.devstack.dev_wallet import describe, run_dev_wallet

    settings = load_settings(state_dir=args.state_dir)
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    try:
        session = asyncio.run(run_dev_wallet(url, settings.state_dir.resolve()))
    except (OSError, ChainError) as error:
        # Tollgate or its dev chain is not there: most often serve is not running.
        print(f"tollgate dev-wallet: {type(error).__name__}: {error} "
              f"(is `tollgate serve` running at {url} with this state dir?)",
              file=sys.stderr)
        return 1
    except RuntimeError as error:
        print(f"tollgate dev-wallet: {error}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, ValueError, KeyError, TypeError) as error:
        # Something answered, but not as Tollgate does (another service on that port).
        print(f"tollgate dev-wallet: the server at {url} does not answer as Tollgate does"
              f" ({type(error).__name__}: {error})", file=sys.stderr)
        return 1
    if args.token:
        print(session.token)
    else:
        print(json.dumps(session.to_json(), indent=2) if args.json else describe(session, url))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    import asyncio

    from app.serve import configure_logging
    from app.storage.database import migrate

    settings = load_settings(state_dir=args.state_dir)
    configure_logging(settings.log_level)
    if settings.database_url is not None and args.state_dir is None:
        migrate(settings.database_url.get_secret_value())
        print("migrated", flush=True)
        return 0
    from app.devstack.postgres import EmbeddedPostgres

    postgres = EmbeddedPostgres(settings.state_dir.resolve() / "postgres")
    url = postgres.start()
    try:
        asyncio.run(postgres.ensure_database())
        migrate(url)
    finally:
        postgres.stop()
    print(f"migrated the embedded database in {postgres.data_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

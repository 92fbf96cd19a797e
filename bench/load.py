"""The load generator of one benchmark cell, run in its own process.

It must not share a core's event loop with the server it measures, so
``bench.run`` starts one of these per cell:

    python -m bench.load --url URL --model M --concurrency 16 --requests 2000 [--stream]

Protocol on stdin/stdout, so the parent can take its measurements of the server
exactly around the measured part: after the warm-up it prints ``warm``, waits
for a line on stdin, runs the measured requests, then prints one JSON line with
the raw samples (see ``CellSamples``).

Streaming requests are timed per read of the socket: a read that hands over more
than one content event means something between the upstream and us held events
back and released them together ("batching"), which a client sees as stutter.
The mock upstream spaces content events ``chunk_delay_ms`` apart, so on a clean
path every content event arrives in a read of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import orjson
import uvloop

REQUEST_TIMEOUT_S = 120.0
EVENT_END = b"\n\n"
DATA_PREFIX = b"data: "
DONE_PAYLOAD = b"[DONE]"
# Extra request headers (a session token) come as JSON in the environment, not in
# argv, so they do not show in the process list.
HEADERS_ENV = "BENCH_HEADERS"


@dataclass(slots=True)
class CellSamples:
    """What one cell measured; times in seconds, one entry per successful request."""

    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttfc_s: list[float] = field(default_factory=list)
    # Gaps between consecutive content events of one stream (streaming only).
    gaps_s: list[float] = field(default_factory=list)
    batched_reads: int = 0
    max_events_per_read: int = 0
    min_content_events: int | None = None
    errors: int = 0
    first_error: str | None = None
    client_cpu_s: float = 0.0


@dataclass(slots=True)
class _Stream:
    """Per-request state of the SSE reader."""

    started: float
    buffer: bytes = b""
    content_events: int = 0
    first_content: float | None = None
    last_content: float | None = None
    done: bool = False


def request_body(model: str, stream: bool, chunks: int, chunk_delay_ms: int) -> bytes:
    """The same small chat request for every target; only the model id differs."""
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something for the benchmark."}],
    }
    if stream:
        # One word per chunk, so every content event carries text. Usage is asked
        # for everywhere because Tollgate always asks its upstream for it.
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        body["mock"] = {"chunks": chunks, "words": chunks, "chunk_delay_ms": chunk_delay_ms}
    else:
        body["mock"] = {"words": 16}
    return orjson.dumps(body)


def _content_of(payload: bytes) -> bool:
    """Whether one event's JSON carries non-empty delta content."""
    document = orjson.loads(payload)
    for choice in document.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            return True
    return False


def _take_events(state: _Stream, data: bytes, now: float, samples: CellSamples) -> None:
    """Consume one socket read: split complete events, time the content ones."""
    state.buffer += data
    *events, state.buffer = state.buffer.split(EVENT_END)
    in_this_read = 0
    for event in events:
        if not event.startswith(DATA_PREFIX):
            continue  # comments (keep-alives) carry no data
        payload = event[len(DATA_PREFIX):]
        if payload == DONE_PAYLOAD:
            state.done = True
        elif _content_of(payload):
            in_this_read += 1
            state.content_events += 1
            if state.first_content is None:
                state.first_content = now
            else:
                assert state.last_content is not None
                samples.gaps_s.append(now - state.last_content)
            state.last_content = now
    if in_this_read > 1:
        samples.batched_reads += 1
    samples.max_events_per_read = max(samples.max_events_per_read, in_this_read)


async def _one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, samples: CellSamples
) -> None:
    state = _Stream(started=time.perf_counter())
    async with session.post(url, data=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for data in response.content.iter_any():
            _take_events(state, data, time.perf_counter(), samples)
    finished = time.perf_counter()
    if not state.done or state.first_content is None:
        raise RuntimeError(f"stream ended without [DONE] after {state.content_events} events")
    samples.latencies_s.append(finished - state.started)
    samples.ttfc_s.append(state.first_content - state.started)
    if samples.min_content_events is None or state.content_events < samples.min_content_events:
        samples.min_content_events = state.content_events


async def _one_completion(
    session: aiohttp.ClientSession, url: str, body: bytes, samples: CellSamples
) -> None:
    started = time.perf_counter()
    async with session.post(url, data=body) as response:
        payload = await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
    samples.latencies_s.append(time.perf_counter() - started)


async def _drive(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    stream: bool,
    concurrency: int,
    requests: int,
) -> CellSamples:
    """Run ``requests`` requests with ``concurrency`` always in flight."""
    samples = CellSamples()
    remaining = requests
    one = _one_stream if stream else _one_completion

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await one(session, url, body, samples)
            except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as error:
                samples.errors += 1
                samples.first_error = samples.first_error or f"{type(error).__name__}: {error}"

    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.wall_s = time.perf_counter() - started
    samples.client_cpu_s = time.process_time() - cpu_before
    return samples


async def run_cell(args: argparse.Namespace) -> CellSamples:
    url = args.url.rstrip("/") + "/chat/completions"
    # No pool limit: the cell's concurrency is the only bound on connections.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json",
               **orjson.loads(os.environ.get(HEADERS_ENV) or "{}")}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        # Warm-up: short non-streaming calls at the cell's concurrency open every
        # connection (ours to the target, the target's to the upstream) cheaply.
        warm_body = request_body(args.model, False, 0, 0)
        warm = await _drive(session, url, warm_body, False, args.concurrency, args.warmup)
        if warm.errors:
            raise SystemExit(f"warm-up failed: {warm.first_error}")
        print("warm", flush=True)
        # Blocking is fine here: nothing else runs in this loop until the go line.
        await asyncio.to_thread(sys.stdin.readline)
        body = request_body(args.model, args.stream, args.chunks, args.chunk_delay_ms)
        return await _drive(session, url, body, args.stream, args.concurrency, args.requests)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.load", description=__doc__)
    parser.add_argument("--url", required=True, help="base URL ending in /v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--chunk-delay-ms", type=int, default=20)
    args = parser.parse_args()
    samples = uvloop.run(run_cell(args))
    sys.stdout.write(orjson.dumps(asdict(samples)).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Where Tollgate's time goes, one call at a time: its ``Server-Timing`` steps, aggregated.

    python -m bench.timing [--stream] [--requests 300] [--gap-ms 0]

Starts the mock upstream and Tollgate (as ``bench.run`` does), sends ``--requests``
calls one after another (after 50 unmeasured ones), ``--gap-ms`` apart, and prints
the client's p50 and each step's p50 and mean in milliseconds, with how many calls
had it (a step under 10 µs is left out of the header). A stream is timed to its
first event, as its header is. Not a goal check: a tool for finding the next cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import uvloop

from bench.run import MODEL_PUBLIC, Target, _tollgate_target, servers

WARMUP_CALLS = 50


async def measure(target: Target, stream: bool, requests: int, gap_s: float
                  ) -> tuple[list[float], dict[str, list[float]]]:
    body: dict[str, object] = {
        "model": MODEL_PUBLIC, "max_tokens": 32,
        "messages": [{"role": "user", "content": "Where does the time go?"}],
    }
    if stream:
        body.update(stream=True, mock={"chunks": 8, "chunk_delay_ms": 20})
    client_ms: list[float] = []
    steps: dict[str, list[float]] = defaultdict(list)
    async with aiohttp.ClientSession(headers=target.headers) as http:
        for index in range(WARMUP_CALLS + requests):
            started = time.perf_counter()
            async with http.post(f"{target.url}/chat/completions", json=body) as response:
                if stream:
                    await response.content.readuntil(b"\n\n")
                    elapsed = time.perf_counter() - started
                    await response.read()
                else:
                    await response.read()
                    elapsed = time.perf_counter() - started
                header = response.headers.get("Server-Timing", "")
            if index >= WARMUP_CALLS:
                client_ms.append(elapsed * 1000)
                for part in header.split(","):
                    name, _, duration = part.strip().partition(";dur=")
                    if duration:
                        steps[name].append(float(duration))
            if gap_s:
                await asyncio.sleep(gap_s)
    return client_ms, steps


def report(stream: bool, client_ms: list[float], steps: dict[str, list[float]]) -> str:
    what = "first event" if stream else "answer"
    lines = [f"client, to the {what}: p50 {statistics.median(client_ms):.2f} ms "
             f"over {len(client_ms)} calls",
             f"{'step':<18}{'p50 ms':>8}{'mean ms':>9}{'calls':>7}"]
    for name, values in steps.items():
        lines.append(f"{name:<18}{statistics.median(values):>8.3f}"
                     f"{statistics.fmean(values):>9.3f}{len(values):>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.timing", description=__doc__)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tollgate-timing-") as workdir, \
            servers(Path(workdir), ["tollgate"]) as started:
        target = _tollgate_target(started["tollgate"])
        client_ms, steps = uvloop.run(
            measure(target, args.stream, args.requests, args.gap_ms / 1000))
    print(report(args.stream, client_ms, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())

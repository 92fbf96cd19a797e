"""Two OS processes sharing one Redis never admit more than the bucket allows together."""

from __future__ import annotations

import math
import multiprocessing
import time

from app.limits.token_buckets import Bucket
from tests.limits.hammer import hammer

CAPACITY = 1_000
# Refill during the test stays far below one token, so the bound is the capacity.
PERIOD_MS = 10**9
ATTEMPTS_PER_PROCESS = 1_500
CONCURRENCY_PER_PROCESS = 32
PROCESS_TIMEOUT_S = 30.0


def test_two_processes_admit_no_more_than_the_limit(redis_url: str, owner: str) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results = context.Queue()
    bucket = Bucket(f"tg:rl:{{{owner}}}:req", CAPACITY, 1, PERIOD_MS)
    processes = [
        context.Process(
            target=hammer,
            args=(redis_url, bucket, ATTEMPTS_PER_PROCESS, CONCURRENCY_PER_PROCESS, start,
                  results),
        )
        for _ in range(2)
    ]
    started_s = time.monotonic()
    for process in processes:
        process.start()
    try:
        counts = [results.get(timeout=PROCESS_TIMEOUT_S) for _ in processes]
    finally:
        for process in processes:
            process.join(PROCESS_TIMEOUT_S)
            if process.is_alive():
                process.kill()
    elapsed_ms = (time.monotonic() - started_s) * 1000
    bound = CAPACITY + math.floor(CAPACITY * elapsed_ms / PERIOD_MS)
    admitted = [admitted for admitted, _ in counts]
    assert all(admitted + refused == ATTEMPTS_PER_PROCESS for admitted, refused in counts)
    assert sum(admitted) <= bound
    assert sum(admitted) == CAPACITY, "every token was taken: attempts exceed the capacity"
    assert all(count > 0 for count in admitted), f"both processes were served: {admitted}"
    assert all(process.exitcode == 0 for process in processes)

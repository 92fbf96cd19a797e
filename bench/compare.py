"""Two versions of Tollgate under the same load, interleaved: did a change make it faster?

    python -m bench.compare REV [--cells json/c64,json/c1,stream/c1] [--rounds 3]

Checks ``REV`` out into a temporary git worktree, starts the mock upstream, Tollgate
from that worktree (``base``) and from this tree as it is (``head``, uncommitted
changes included), and runs each cell against both in interleaved rounds, as
``bench.run`` does. On this VM, runs minutes apart differ by 20-50%, so two
separate ``make bench`` runs cannot tell a 10% change from drift; two targets in
one run can, down to what an A/A run shows (about 8% for json/c64: repeat to be
sure). Prints one line per cell and target, and head's change against base.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.run import (
    REPO,
    ROUNDS,
    CellResult,
    Server,
    _selected,
    _tollgate_target,
    plan,
    run_rounds,
    start_mock,
    start_tollgate,
    stop_leftovers,
    stop_server,
)

DEFAULT_CELLS = "json/c64,json/c1,stream/c1"
# (label, stats key, format, higher is better)
FIGURES = (
    ("req/s", "throughput_rps", "{:8.0f}", True),
    ("p50 ms", "p50_ms", "{:8.2f}", False),
    ("ttfc50 ms", "ttfc_p50_ms", "{:9.2f}", False),
    ("cpu us/req", "server_cpu_us_per_req", "{:10.0f}", False),
    ("batched", "batched_reads", "{:7d}", False),
)


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tollgate-base-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet",
                        str(tree), revision], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(tree)], check=False)


def report(results: list[CellResult]) -> str:
    lines = [f"{'cell':<10} {'target':<6} " + " ".join(
        f"{label:>{len(fmt.format(0))}}" for label, _, fmt, _ in FIGURES)]
    by_cell: dict[str, dict[str, CellResult]] = {}
    for result in results:
        by_cell.setdefault(result.scenario.key, {})[result.target] = result
    for key, pair in by_cell.items():
        for name in ("base", "head"):
            stats = pair[name].stats
            cells = [fmt.format(stats[k]) if stats.get(k) is not None
                     else " " * len(fmt.format(0)) for _, k, fmt, _ in FIGURES]
            lines.append(f"{key:<10} {name:<6} " + " ".join(cells))
        changes = []
        for label, k, _, higher_is_better in FIGURES:
            base, head = pair["base"].stats.get(k), pair["head"].stats.get(k)
            if base and head is not None:
                change = (head - base) / base * 100
                better = change > 0 if higher_is_better else change < 0
                changes.append(f"{label} {change:+.1f}% ({'better' if better else 'worse'})")
        lines.append(f"{'':<10} head vs base: " + ", ".join(changes))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.compare", description=__doc__)
    parser.add_argument("revision", help="the base: any git revision")
    parser.add_argument("--cells", default=DEFAULT_CELLS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    cells = _selected(plan(quick=False), args.cells)
    started: list[Server] = []
    with worktree(args.revision) as tree, \
            tempfile.TemporaryDirectory(prefix="tollgate-compare-") as work:
        workdir = Path(work)
        try:
            mock = start_mock(workdir)
            started.append(mock)
            targets = []
            for name, root in (("base", tree), ("head", REPO)):
                print(f"starting {name} tollgate...", file=sys.stderr, flush=True)
                server = start_tollgate(workdir, mock.url, name=name, root=root)
                started.append(server)
                targets.append(dataclasses.replace(_tollgate_target(server), name=name))
            results = []
            for scenario in cells:
                results += run_rounds(targets, scenario, args.rounds, mock, workdir)
        finally:
            for server in reversed(started):
                stop_server(server)
            stop_leftovers(workdir)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

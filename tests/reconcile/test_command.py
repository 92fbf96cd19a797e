"""``tollgate reconcile`` as an operator runs it: a process, its output and its exit status."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.reconcile.render import CSV_COLUMNS
from tests.conftest import REPO
from tests.reconcile.world import (
    World,
    execute,
    new_account,
    paid_on_chain,
    record_payment,
)


async def tollgate_reconcile(*args: str, env: dict[str, str], state_dir: Path
                             ) -> tuple[int, str, str]:
    """Run the command; (exit status, stdout, stderr)."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("TOLLGATE_") and name != "DATABASE_URL"}
    environment.update(env, TOLLGATE_STATE_DIR=str(state_dir))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "reconcile", *args, cwd=REPO, env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_exit_0_when_it_reconciles_then_1_after_tampering(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    payer, reference, tx_hash = await paid_on_chain(world, 1_000_000)
    account_id = await new_account(world.engine, payer.address)
    await record_payment(world.engine, account_id=account_id, reference=reference,
                         amount=1_000_000, payer=payer.address, tx_hash=tx_hash)
    env = world.chain_environment()

    status, table, _ = await tollgate_reconcile(env=env, state_dir=tmp_path)
    assert status == 0, table
    assert "1 matched" in table and table.rstrip().endswith("RECONCILES")

    await execute(world.engine, "UPDATE payments SET amount_micros = 999999"
                  " WHERE reference = :reference", reference=reference)
    _, unknown_reference, _ = await paid_on_chain(world, 5_000)

    status, output, _ = await tollgate_reconcile("--json", env=env, state_dir=tmp_path)
    assert status == 1
    document = json.loads(output)
    assert document["reconciles"] is False
    assert document["counts"]["amount_mismatch"] == 1
    assert document["counts"]["missing_in_ledger"] == 1
    by_reference = {finding["reference"]: finding for finding in document["findings"]}
    assert by_reference[reference]["category"] == "amount_mismatch"
    assert by_reference[reference]["account"] == f"acct_{account_id}"
    assert by_reference[unknown_reference]["category"] == "missing_in_ledger"
    assert [breach["check"] for breach in document["invariants"]] == ["paid_total"]

    status, output, _ = await asyncio.to_thread(
        run_in_process, "--csv", env=env, state_dir=tmp_path, monkeypatch=monkeypatch,
        capsys=capsys)
    assert status == 1
    rows = list(csv.DictReader(io.StringIO(output)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {(row["section"], row["category"]) for row in rows} == {
        ("finding", "amount_mismatch"), ("finding", "missing_in_ledger"),
        ("invariant", "paid_total")}
    mismatch = next(row for row in rows if row["category"] == "amount_mismatch")
    assert (mismatch["ledger_amount_micros"], mismatch["chain_amount_micros"]) == (
        "999999", "1000000")


def run_in_process(*args: str, env: dict[str, str], state_dir: Path,
                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                   ) -> tuple[int, str, str]:
    """The command's ``main`` in this process: a second interpreter costs two seconds of
    imports, which a test pays once (``tollgate_reconcile``), not for every case."""
    for name in [*os.environ]:
        if name.startswith("TOLLGATE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    for name, value in {**env, "TOLLGATE_STATE_DIR": str(state_dir)}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    status = main(["reconcile", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


async def test_without_a_chain_the_ledger_alone_is_checked(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, table, _ = await asyncio.to_thread(
        run_in_process, env={"DATABASE_URL": world.database_url}, state_dir=tmp_path,
        monkeypatch=monkeypatch, capsys=capsys)

    assert status == 0, table
    assert "chain: skipped (no chain is configured" in table


async def test_exit_2_when_the_chain_or_the_database_cannot_be_reached(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
        return run_in_process(*args, env=env, state_dir=tmp_path, monkeypatch=monkeypatch,
                              capsys=capsys)

    env = {**world.chain_environment(), "TOLLGATE_CHAIN_RPC_URL": "http://127.0.0.1:9"}
    status, output, error = await asyncio.to_thread(run, env=env)
    assert (status, output) == (2, "")
    assert error.startswith("tollgate reconcile: chain: RpcUnavailable")

    env = {**world.chain_environment(),
           "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/nothing"}
    status, _, error = await asyncio.to_thread(run, env=env)
    assert status == 2
    assert error.startswith("tollgate reconcile: database:")

    status, _, error = await asyncio.to_thread(run, "--state-dir", str(tmp_path), env={})
    assert status == 2
    assert "no embedded database in" in error

    # A state dir whose dev chain is deployed but not running (no `tollgate serve`).
    chain_dir = tmp_path / "chain"
    await asyncio.to_thread(chain_dir.mkdir)
    await asyncio.to_thread((chain_dir / "deployment.json").write_text, "{}")
    status, _, error = await asyncio.to_thread(run, env={"DATABASE_URL": world.database_url})
    assert status == 2
    assert "the dev chain of " in error and f"{tmp_path.name} is not running" in error

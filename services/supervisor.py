"""Bring failed services back, as compose's `restart: on-failure` does, and give up on a crash loop.

`adrenaline up` polls a `Supervisor` over its `ProcessGroup`: a child that exits with a failure
(a non-zero code, or killed by a signal) is started again with the same command after a delay
that doubles with each recent restart (0.5 s, 1 s, 2 s ... at most 30 s); one that exits with 0
stopped on purpose and is left alone. A child restarted `max_restarts` times within `window_s`
is in a crash loop: restarting it again only burns the machine, so it is reported and given up
on. A restarted instance rejoins by itself: it heartbeats under its old id with a new UCX worker
address, from which the scheduler knows that whatever the old process held is gone.

The same budget (`RestartBudget`) decides for nats-server, which is not a `ProcessGroup` child.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.launcher import Child, ProcessGroup


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_restarts: int = 5  # within window_s; one more failure is a crash loop
    window_s: float = 120.0


@dataclass
class RestartBudget:
    """One process's recent restarts; says how long to wait before the next, or that it is a crash loop."""

    policy: RestartPolicy
    restarts: list[float] = field(default_factory=list)

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before restarting after a failure at `now`; None to give up."""
        self.restarts = [t for t in self.restarts if now - t < self.policy.window_s]
        if len(self.restarts) >= self.policy.max_restarts:
            return None
        return min(self.policy.max_delay_s, self.policy.first_delay_s * 2 ** len(self.restarts))

    def restarted(self, now: float) -> None:
        self.restarts.append(now)


class Supervisor:
    def __init__(
        self, group: ProcessGroup, policy: RestartPolicy | None = None, say: Callable[[str], None] = print
    ) -> None:
        self.group = group
        self.policy = policy or RestartPolicy()
        self.say = say
        self.budgets: dict[str, RestartBudget] = {}
        self.due: dict[str, float] = {}  # child name -> when to restart it
        self.given_up: list[str] = []

    def poll(self, now: float | None = None) -> None:
        """Notice children that ended and restart those whose delay is over; call it every so often."""
        now = time.monotonic() if now is None else now
        for child in self.group.dead():
            if child.name not in self.due:
                self._ended(child, now)
        for child in self.group.dead():
            when = self.due.get(child.name)
            if when is not None and now >= when:
                del self.due[child.name]
                self.budgets[child.name].restarted(now)
                self.group.respawn(child)
                self.say(f"{child.name} restarted")

    def _ended(self, child: Child, now: float) -> None:
        code = child.process.returncode
        where = f"; see {child.log_path}" if child.log_path else ""
        if code == 0:
            self.say(f"{child.name} exited cleanly; not restarting it{where}")
            self.group.children.remove(child)
            return
        budget = self.budgets.setdefault(child.name, RestartBudget(self.policy))
        delay = budget.next_delay(now)
        if delay is None:
            self.say(
                f"error: {child.name} exited with {code} after {len(budget.restarts)} restarts in "
                f"{self.policy.window_s:g} s: a crash loop, giving up on it{where}"
            )
            self.group.children.remove(child)
            self.given_up.append(child.name)
            return
        self.say(f"warning: {child.name} exited with {code}; restarting it in {delay:g} s{where}")
        self.due[child.name] = now + delay

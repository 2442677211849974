"""Judge peers dead by their silence only while we ourselves have been able to hear them.

An instance is declared dead after `dead_after_s` without a heartbeat. But silence also comes
from our side: a watcher that was paused (SIGSTOP, a long GC, a starved core) or a NATS server
that was paused or restarting hears nobody, and judging then declared every instance dead at
once and failed every request in flight. So a `Hearing` judges only after it has heard well for
`dead_after_s` in a row: its own loop ticked on time, and a message it sent itself through NATS
came back each time. A pause of ours, or of NATS, restarts that clock; the heartbeats buffered
meanwhile arrive.

After a recovery (and at start-up) every peer gets longer, so an instance that is really gone is
found up to that much later than it would have been: `RECOVERY_GRACE` times `dead_after_s` from the
recovery. After a NATS pause each peer's own connection drains what it queued meanwhile (token
batches and heartbeats, in order), and on a loaded machine that can outlast our own first round
trips: a heartbeat it queued can arrive first and its next ones a second or more later.

The round trip is a request to an echo subscription of our own rather than a PING/PONG flush:
nats-py 2.x leaves a timed-out flush's future in its queue, and the late PONG then kills the
connection's read loop.
"""

from __future__ import annotations

import time
import uuid

from nats.aio.subscription import Subscription

from common.bus import Bus, Reply, ServiceUnavailable
from common.messages import Ack, MessageError

RECOVERY_GRACE = 4.0  # in dead_after_s, from our recovery: how long a peer not heard since has


class Hearing:
    def __init__(self, bus: Bus, prefix: str, dead_after_s: float, tick_s: float) -> None:
        self.bus = bus
        self.subject = f"{prefix}.liveness.{uuid.uuid4().hex}"  # ours alone
        self.dead_after_s = dead_after_s
        self.tick_s = tick_s  # how often `tick` is called
        self._last_tick = time.monotonic()
        self._hearing_since = self._last_tick
        self._echo: Subscription | None = None

    async def start(self) -> None:
        async def echo(message: Ack, reply: Reply | None) -> None:
            if reply is not None:
                await reply(message)

        self._echo = await self.bus.subscribe(self.subject, Ack, echo)

    async def stop(self) -> None:
        if self._echo is not None:
            await self._echo.unsubscribe()
            self._echo = None

    async def tick(self) -> None:
        """Call every `tick_s`: notes a late tick of ours, or a message of ours NATS did not bring back."""
        late = time.monotonic() - self._last_tick > self.tick_s + self.dead_after_s / 2
        try:
            await self.bus.request(self.subject, Ack(True), Ack, timeout=self.dead_after_s / 2)
            heard = True
        except (ServiceUnavailable, MessageError):
            heard = False
        self._last_tick = time.monotonic()
        if late or not heard:
            self._hearing_since = self._last_tick

    @property
    def since(self) -> float:
        """When (monotonic) we began hearing well: silence before it says nothing about a peer."""
        return self._hearing_since

    @property
    def judging(self) -> bool:
        """True once we have heard well for `dead_after_s` (our health); a peer's silence means
        death only `RECOVERY_GRACE` times that after a recovery (`silent`)."""
        return time.monotonic() - self._hearing_since >= self.dead_after_s

    def silent(self, seen: float, now: float | None = None) -> bool:
        """True when a peer last heard at `seen` (monotonic) is to be judged gone."""
        now = time.monotonic() if now is None else now
        if seen >= now - self.dead_after_s:
            return False
        # Every peer gets the grace after a recovery, heard since or not: the first heartbeat to
        # arrive can be one it queued during the pause, and the next ones wait behind the rest of
        # its backlog (a decode instance of 12 streams was judged gone 1 s after NATS resumed).
        return now - self._hearing_since >= RECOVERY_GRACE * self.dead_after_s

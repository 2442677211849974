"""Telling gateways that their waiting requests are held, so that a long wait is not read as death.

A request can wait for a while before its next token: queued on a prefill or decode instance
(for a step, preempted, or queued to recompute for room) or at the scheduler (for room on a
decode instance or an executor). A wait behind long outputs can outlast the gateway's token
timeout, which would fail a request nothing is wrong with; so whoever holds it sends its gateway
an event with no token at its next output index every `KEEPALIVE_S` (`TokenEvent.keeps_alive`).
Torch-free: the scheduler uses it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from common.bus import Bus
from common.messages import KEEPALIVE_S, TokenBatch, TokenEvent


class KeepAlive:
    """Call as often as convenient (between steps, on a timer): it sends at most every `KEEPALIVE_S`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.next_at = 0.0  # monotonic

    async def tick(self, waiting: Iterable[tuple[str, int]], subject_of: Callable[[str], str | None]) -> None:
        """`waiting`: (request id, its next output index) of each held request; `subject_of` names
        its gateway's token subject (None: not ours to keep alive)."""
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + KEEPALIVE_S
        events: dict[str, list[TokenEvent]] = {}
        for request_id, next_index in waiting:
            subject = subject_of(request_id)
            if subject is not None:
                events.setdefault(subject, []).append(TokenEvent(request_id, [], first_index=next_index))
        for subject, batch in events.items():
            await self.bus.publish(subject, TokenBatch(batch))

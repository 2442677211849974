"""What a decode instance tells others between steps: the executor wait it reports decays to
"unknown", and the requests waiting for a step are kept alive at their gateways (prefill
instances and the scheduler do the same with `common.keepalive.KeepAlive`)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import cast

from common.bus import Bus
from common.engine import Engine
from common.keepalive import KeepAlive
from common.messages import KEEPALIVE_S, TokenBatch
from common.request import Request
from services.decode.service import STALL_TTL_S, stall_estimate
from services.runtime import waiting_at


def test_a_measured_wait_is_reported_until_it_is_stale_then_unknown() -> None:
    assert stall_estimate(None, 0.0, 1.0) is None  # never measured
    assert stall_estimate(0.02, 100.0, 100.0 + STALL_TTL_S / 2) == 0.02
    assert stall_estimate(0.02, 100.0, 100.0 + STALL_TTL_S + 0.1) is None  # a load that has passed


def test_requests_waiting_for_a_step_are_kept_alive_every_keepalive_s() -> None:
    """An instance tells the gateway of each request waiting on it that it is held (an event with
    no token at its next output index), at most every KEEPALIVE_S; requests it does not hold (no
    token subject) and running ones get none."""
    published: list[tuple[str, TokenBatch]] = []

    async def publish(subject: str, message: TokenBatch) -> None:
        published.append((subject, message))

    waiting = [
        SimpleNamespace(request_id="w1", output_token_ids=[5, 6]),
        SimpleNamespace(request_id="w2", output_token_ids=[]),
        SimpleNamespace(request_id="gone", output_token_ids=[]),
    ]
    subjects = {"w1": "tokens.a", "w2": "tokens.b", "running": "tokens.a"}
    keepalive = KeepAlive(cast(Bus, SimpleNamespace(publish=publish)))

    def tick() -> None:
        engine = SimpleNamespace(waiting=cast(list[Request], waiting))  # what waits between steps
        asyncio.run(keepalive.tick(waiting_at(cast(Engine, engine)), subjects.get))

    tick()
    sent = {
        subject: [(e.request_id, e.first_index, e.keeps_alive) for e in batch.events] for subject, batch in published
    }
    assert sent == {"tokens.a": [("w1", 2, True)], "tokens.b": [("w2", 0, True)]}
    tick()  # within KEEPALIVE_S: nothing more
    assert len(published) == 2
    keepalive.next_at = time.monotonic() - 0.1
    tick()
    assert len(published) == 4 and keepalive.next_at > time.monotonic() + KEEPALIVE_S - 1

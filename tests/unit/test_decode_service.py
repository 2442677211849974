"""What a decode instance tells others between steps: the executor wait it reports decays to
"unknown", and the requests waiting for room are kept alive at their gateways."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from common.messages import KEEPALIVE_S, TokenBatch
from services.decode.service import STALL_TTL_S, DecodeService, stall_estimate


def test_a_measured_wait_is_reported_until_it_is_stale_then_unknown() -> None:
    assert stall_estimate(None, 0.0, 1.0) is None  # never measured
    assert stall_estimate(0.02, 100.0, 100.0 + STALL_TTL_S / 2) == 0.02
    assert stall_estimate(0.02, 100.0, 100.0 + STALL_TTL_S + 0.1) is None  # a load that has passed


def test_requests_waiting_for_room_are_kept_alive_every_keepalive_s() -> None:
    """The decode instance tells the gateway of each request waiting for room that it is held (an
    event with no token at its next output index), at most every KEEPALIVE_S; running and
    finished requests get none."""
    published: list[tuple[str, TokenBatch]] = []

    async def publish(subject: str, message: TokenBatch) -> None:
        published.append((subject, message))

    waiting = [
        SimpleNamespace(request_id="w1", output_token_ids=[5, 6]),
        SimpleNamespace(request_id="w2", output_token_ids=[]),
    ]
    service = SimpleNamespace(
        next_keepalive=0.0,
        engine=SimpleNamespace(waiting=waiting),
        token_subjects={"w1": "tokens.a", "w2": "tokens.b", "running": "tokens.a"},
        bus=SimpleNamespace(publish=publish),
    )
    keep = DecodeService._keep_waiting_alive
    asyncio.run(keep(service))  # type: ignore[arg-type]
    sent = {
        subject: [(e.request_id, e.first_index, e.keeps_alive) for e in batch.events] for subject, batch in published
    }
    assert sent == {"tokens.a": [("w1", 2, True)], "tokens.b": [("w2", 0, True)]}
    asyncio.run(keep(service))  # type: ignore[arg-type]  # within KEEPALIVE_S: nothing more
    assert len(published) == 2
    service.next_keepalive = time.monotonic() - 0.1
    asyncio.run(keep(service))  # type: ignore[arg-type]
    assert len(published) == 4 and service.next_keepalive > time.monotonic() + KEEPALIVE_S - 1

"""The scheduler's judgement of gateways by their heartbeats (`Scheduler.reap_gateways`), on its own.

A gateway that dies for good leaves requests that nothing else stops before their `max_tokens`:
the scheduler aborts them once the gateway has been silent for `gateway_dead_after_s` while the
scheduler itself could hear. Times are set, not waited for: no test here sleeps.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common.messages import AbortRequest, GatewayHeartbeat
from common.subjects import Subjects
from services.scheduler.service import MAX_GATEWAYS, Scheduler, SchedulerSettings, _InFlight

S = Subjects("t")
DEAD, ALIVE, SILENT_CLIENT = S.tokens("gw-dead"), S.tokens("gw-alive"), S.tokens("test-client")


class Recorder:
    """Stands in for the scheduler's `Bus`: what it publishes, where."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []

    async def publish(self, subject: str, message: Any) -> None:
        self.published.append((subject, message))


def _scheduler() -> tuple[Scheduler, Recorder]:
    bus = Recorder()
    settings = SchedulerSettings(subjects_prefix="t", gateway_dead_after_s=10.0)
    return Scheduler(settings, bus), bus  # type: ignore[arg-type]


def _flight(token_subject: str) -> _InFlight:
    return _InFlight("prefill-0", "decode-0", token_subject, 5, 4, 20)


def test_a_silent_gateways_requests_are_aborted_and_no_one_elses() -> None:
    scheduler, bus = _scheduler()
    asyncio.run(scheduler.on_gateway_heartbeat(GatewayHeartbeat("gw-dead", DEAD), None))
    asyncio.run(scheduler.on_gateway_heartbeat(GatewayHeartbeat("gw-alive", ALIVE), None))
    scheduler.inflight = {"a": _flight(DEAD), "b": _flight(ALIVE), "c": _flight(DEAD), "d": _flight(SILENT_CLIENT)}
    now = time.monotonic()
    scheduler.hearing._hearing_since = now - 60  # we have heard well for a minute
    scheduler.gateways[DEAD] = now - 11  # past the bound
    scheduler.gateways[ALIVE] = now - 9  # within it

    asyncio.run(scheduler.reap_gateways())

    assert [(subject, m.request_id) for subject, m in bus.published] == [(S.abort, "a"), (S.abort, "c")]
    assert all(isinstance(m, AbortRequest) and "gateway" in m.reason for _, m in bus.published)
    # the live gateway's request, and one from a client that never heartbeats, go on
    assert set(scheduler.inflight) == {"b", "d"}
    assert set(scheduler.gateways) == {ALIVE}  # the dead one is forgotten: the table holds live ones


def test_silence_while_the_scheduler_could_not_hear_does_not_count() -> None:
    """After a pause of the scheduler or of NATS (`Hearing.since` is recent), every gateway has the
    whole bound again: a gateway last heard long ago is not judged on time nobody could hear it."""
    scheduler, bus = _scheduler()
    asyncio.run(scheduler.on_gateway_heartbeat(GatewayHeartbeat("gw-dead", DEAD), None))
    scheduler.inflight = {"a": _flight(DEAD)}
    now = time.monotonic()
    scheduler.gateways[DEAD] = now - 60
    scheduler.hearing._hearing_since = now - 5  # hearing again for 5 s of a 10 s bound
    asyncio.run(scheduler.reap_gateways())
    assert not bus.published and set(scheduler.inflight) == {"a"}

    scheduler.hearing._hearing_since = now - 11  # and now the bound has passed while hearing
    asyncio.run(scheduler.reap_gateways())
    assert [m.request_id for _, m in bus.published] == ["a"] and not scheduler.inflight


def test_the_gateway_table_is_bounded() -> None:
    scheduler, _ = _scheduler()

    async def flood() -> None:
        for i in range(MAX_GATEWAYS + 5):
            await scheduler.on_gateway_heartbeat(GatewayHeartbeat(f"g{i}", S.tokens(f"g{i}")), None)

    asyncio.run(flood())
    assert len(scheduler.gateways) == MAX_GATEWAYS
    assert S.tokens("g0") not in scheduler.gateways and S.tokens(f"g{MAX_GATEWAYS + 4}") in scheduler.gateways

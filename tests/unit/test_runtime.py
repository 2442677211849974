from __future__ import annotations

import asyncio
import faulthandler
import time

import pytest

from common.messages import TokenBatch, encode
from common.request import PromptLogprobs
from services.runtime import STEP_CLOCK, Tombstones, prompt_logprob_events, watch_loop


def test_tombstones_remember_aborts_for_their_ttl() -> None:
    tombs = Tombstones(ttl_s=60.0)
    start = time.monotonic()
    tombs.add("r1", now=start)
    assert "r1" in tombs and "r2" not in tombs and 5 not in tombs
    tombs.add("r2", now=start + 61.0)  # r1 has expired: dropped as r2 comes
    assert len(tombs) == 1


def test_tombstones_stay_bounded_and_each_abort_is_cheap() -> None:
    tombs = Tombstones(ttl_s=3600.0, max_ids=1000)
    for i in range(50_000):  # an abort storm, all within the TTL
        tombs.add(f"r{i}")
    assert len(tombs) == 1000
    assert "r49999" in tombs and "r48999" not in tombs  # the oldest went first
    tombs.add("r49999")  # a repeated abort refreshes, never duplicates
    assert len(tombs) == 1000


def test_prompt_logprobs_travel_in_messages_under_the_nats_payload_limit() -> None:
    """A long prompt's logprobs with 20 alternatives each (the most asked) would make messages of
    MBs; split, every message stays far under NATS's 1 MB, and together they are the whole."""
    n, k = 2000, 20
    prompt = PromptLogprobs([-1.5] * n, [[(i % 50_000 + j, -2.25 - j) for j in range(k)] for i in range(n)])
    events = prompt_logprob_events("r-1", prompt)
    assert len(events) > 1
    assert all(len(encode(TokenBatch([e]))) < 2**20 // 2 for e in events)
    assert all(not e.token_ids and e.finish_reason is None for e in events)
    assert [x for e in events for x in e.prompt_logprobs] == prompt.logprobs
    assert [row for e in events for row in e.prompt_top_logprobs] == prompt.top
    assert prompt_logprob_events("r-1", PromptLogprobs([], [])) == []  # a one-token prompt: nothing to send


def test_a_stuck_engine_step_has_the_stacks_dumped_once(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step stuck in its worker thread leaves the event loop running: the watch dumps every
    thread's stack once for that step (the evidence a hang leaves), and not for a quick one."""
    monkeypatch.setattr(faulthandler, "enable", lambda *args, **kwargs: None)  # pytest's own stays

    async def scenario() -> None:
        watch = asyncio.create_task(watch_loop(tick_s=0.01, stuck_s=0.1))
        try:
            STEP_CLOCK.since = time.monotonic()  # a step that just began: not stuck yet
            await asyncio.sleep(0.05)
            assert "Thread 0x" not in capfd.readouterr().err
            await asyncio.sleep(0.3)  # now past stuck_s, for several ticks
        finally:
            STEP_CLOCK.since = 0.0
            watch.cancel()

    asyncio.run(scenario())
    dumped = capfd.readouterr().err
    assert dumped.count("Current thread 0x") == 1 and "in watch_loop" in dumped

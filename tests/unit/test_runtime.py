from __future__ import annotations

import time

from common.messages import TokenBatch, encode
from common.request import PromptLogprobs
from services.runtime import Tombstones, prompt_logprob_events


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

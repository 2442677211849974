"""The scheduler's own queue (`Scheduler.held`): under the auto policy, a request that the policy
keeps local while its decode instance is under memory pressure waits at the scheduler, first come
first served, and is decided again when room may have appeared, so that an executor that frees
room takes it rather than leaving it queued on the decode instance.

The scheduler runs on its own here, fed heartbeats by hand, with a stand-in for its `Bus` that
records what it publishes and accepts every prefill task; decisions come from injected step models
(no profiling, no timing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from common.messages import (
    AbortRequest,
    Ack,
    InstanceLoad,
    PrefillTask,
    RequestsEnded,
    Sampling,
    SubmitReply,
    SubmitRequest,
    TokenEvent,
)
from common.step_model import StepModel
from common.subjects import Subjects
from services.scheduler.service import Scheduler, SchedulerSettings

S = Subjects("t")
GATEWAY = S.tokens("gw")
# a decode step: 10 ms + 1 ms per request + 10 us per context token; attention alike on the executor
STEP = StepModel(0.010, 0.001, 10e-6)
ATTENTION = StepModel(0, 0, 10e-6).to_wire()
PROMPT, NEW = 50, 50  # each request may hold 100 tokens; its coming mean length is 75


class Bus:
    """Stands in for the scheduler's `Bus`: records publishes and prefill tasks, accepts every task."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []
        self.tasks: list[PrefillTask] = []

    async def publish(self, subject: str, message: Any) -> None:
        self.published.append((subject, message))

    async def request(self, subject: str, message: Any, reply_type: type, timeout: float) -> Ack:
        assert isinstance(message, PrefillTask) and subject == S.instance("prefill-0", "prefill")
        self.tasks.append(message)
        return Ack(True)

    def events(self) -> list[TokenEvent]:
        return [e for subject, m in self.published if subject == GATEWAY for e in m.events]


def _loads(free: bool = True) -> list[InstanceLoad]:
    decode = InstanceLoad(
        "decode-0", "decode", b"d", 16, 10, 10 if free else 0, 0, 0,  # 160 tokens: one request at its maximum
        step_model=STEP.to_wire(), attention_model=ATTENTION, max_num_seqs=64,
    )  # fmt: skip
    executor = InstanceLoad(
        "executor-0", "executor", b"e", 16, 20, 20 if free else 0, 0, 0, "prefill-0", attention_model=ATTENTION
    )
    prefill = InstanceLoad("prefill-0", "prefill", b"p", 16, 100, 100, 0, 0)
    return [decode, executor, prefill]


class Harness:
    def __init__(self, **settings: Any) -> None:
        self.bus = Bus()
        self.scheduler = Scheduler(SchedulerSettings(subjects_prefix="t", **settings), self.bus)  # type: ignore[arg-type]
        self.replies: dict[str, SubmitReply] = {}

    async def heartbeats(self, free: bool = True) -> None:
        for load in _loads(free):
            await self.scheduler.on_load(load, None)

    async def submit(self, rid: str) -> SubmitReply:
        async def reply(answer: Any) -> None:
            self.replies[rid] = answer

        sampling = Sampling(max_new_tokens=NEW, temperature=0.0)
        await self.scheduler.on_submit(SubmitRequest(rid, list(range(3, 3 + PROMPT)), sampling, GATEWAY), reply)
        await self.settle()
        return self.replies[rid]

    async def settle(self) -> None:
        """Let the dispatch tasks (the prefill's ack, the gateway's answer) run."""
        while self.scheduler.dispatches:
            await asyncio.gather(*self.scheduler.dispatches)

    async def finish(self, rid: str) -> None:
        await self.scheduler.on_ended(RequestsEnded([rid]), None)
        await self.settle()

    def routed(self) -> dict[str, str]:
        """Request id -> where its decode attention runs: the executor's id, or "local"."""
        return {t.request.request_id: t.executor_id or "local" for t in self.bus.tasks}


def test_a_request_kept_local_under_pressure_waits_here_and_goes_where_room_appears() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.heartbeats()
        # r0 local (room, nothing to hide behind); then pressure: offloaded while C1 allows (twice
        # the decode's 160 tokens: 4 x 75 of coming context fit; 5 x 75 do not, nor 5 x 100 at once)
        for i in range(5):
            assert (await h.submit(f"r{i}")).decode_id == "decode-0"
        assert h.routed() == {"r0": "local", **{f"r{i}": "executor-0" for i in range(1, 5)}}
        # r5 is refused by C1 and the decode instance cannot hold it beside r0: accepted, held here
        for rid in ("r5", "r6"):
            answer = await h.submit(rid)
            assert answer.accepted and answer.status == 200 and answer.decode_id == ""
        assert list(h.scheduler.held) == ["r5", "r6"] and len(h.bus.tasks) == 5
        # an offloaded request ends: the oldest held request takes its place on the executor, the next waits
        await h.finish("r1")
        assert h.routed()["r5"] == "executor-0" and list(h.scheduler.held) == ["r6"]
        # the local request ends: the decode instance has room for r6 at its maximum length (and,
        # with nothing local left for remote attention to hide behind, the policy keeps it local)
        await h.finish("r0")
        assert h.routed()["r6"] == "local" and not h.scheduler.held
        assert len(h.bus.tasks) == 7  # each request handed to prefill once

    asyncio.run(scenario())


def test_decode_heartbeats_say_how_long_its_requests_are_now() -> None:
    """The books the policy reads count each request at its current length, from its decode
    instance's heartbeat (the scheduler reads no token stream); a length from an instance the
    request is not on, or for a request that ended, changes nothing."""

    async def scenario() -> None:
        h = Harness()
        await h.heartbeats()
        await h.submit("r0")
        assert h.scheduler._books("decode-0").local_tokens == PROMPT
        decode = _loads()[0]
        await h.scheduler.on_load(dataclasses.replace(decode, lengths=[("r0", PROMPT + 12), ("other", 99)]), None)
        assert h.scheduler.inflight["r0"].generated == 12 and "other" not in h.scheduler.inflight
        assert h.scheduler._books("decode-0").local_tokens == PROMPT + 12
        stranger = dataclasses.replace(decode, instance_id="decode-1", lengths=[("r0", PROMPT + 40)])
        await h.scheduler.on_load(stranger, None)
        assert h.scheduler.inflight["r0"].generated == 12
        await h.finish("r0")
        await h.scheduler.on_load(dataclasses.replace(decode, lengths=[("r0", PROMPT + 13)]), None)
        assert "r0" not in h.scheduler.inflight

    asyncio.run(scenario())


def test_a_request_resumed_after_its_executor_handed_it_back_is_placed_again_first() -> None:
    """A full executor hands a request back; its decode instance sends it here with its output so
    far (`Subjects.resume`). Its old placement is forgotten (the executor's share of the books
    shrinks), it waits ahead of the requests held before it came, is kept alive at the index of
    its next token, and goes to a prefill instance with its output, to recompute their KV too."""

    async def scenario() -> None:
        h = Harness()
        await h.heartbeats()
        for i in range(7):
            await h.submit(f"r{i}")
        assert list(h.scheduler.held) == ["r5", "r6"]  # C1: r1-r4 fill the executor
        sampling = Sampling(max_new_tokens=NEW, temperature=0.0)
        resumed = SubmitRequest("r2", list(range(3, 3 + PROMPT)), sampling, GATEWAY, output_token_ids=[9] * 10)
        await h.scheduler.on_resume(resumed, None)
        await h.settle()
        # r2 no longer counts on the executor: there is room for one (its prompt and output so far,
        # 60 tokens, and a block), and r2 goes first
        assert list(h.scheduler.held) == ["r5", "r6"] and h.routed()["r2"] == "executor-0"
        task = h.bus.tasks[-1]
        assert task.request.output_token_ids == [9] * 10 and h.scheduler.inflight["r2"].generated == 10
        # a resume of a request that ended meanwhile (or another scheduler's) is dropped
        await h.scheduler.on_resume(SubmitRequest("gone", [3], sampling, GATEWAY, output_token_ids=[4]), None)
        assert "gone" not in h.scheduler.held and "gone" not in h.scheduler.inflight
        # resumed while nothing has room: held at the head, kept alive at its next token's index
        await h.heartbeats(free=False)
        await h.scheduler.on_resume(dataclasses.replace(resumed, request_id="r3"), None)
        assert list(h.scheduler.held) == ["r3", "r5", "r6"]
        h.scheduler.keepalive.next_at = 0.0
        await h.scheduler.keep_held_alive()
        alive = {e.request_id: e.first_index for e in h.bus.events() if e.keeps_alive}
        assert alive == {"r3": 10, "r5": 0, "r6": 0}

    asyncio.run(scenario())


def test_newcomers_wait_behind_the_held_and_aborts_and_silent_gateways_leave_the_queue() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.heartbeats()
        for i in range(8):
            await h.submit(f"r{i}")
        assert list(h.scheduler.held) == ["r5", "r6", "r7"]
        # the held are told they wait (the gateway's token timeout), with no token and no ending
        await h.scheduler.keep_held_alive()
        alive = [e for e in h.bus.events() if e.keeps_alive]
        assert sorted(e.request_id for e in alive) == ["r5", "r6", "r7"]
        # an abort of a held request: gone from the queue, and its gateway hears why
        await h.scheduler.on_abort(AbortRequest("r6", "client went away"), None)
        assert list(h.scheduler.held) == ["r5", "r7"]
        assert [(e.request_id, e.finish_reason) for e in h.bus.events() if e.finish_reason] == [("r6", "error")]
        # a gateway silent past its bound: its held requests are forgotten
        now = time.monotonic()
        h.scheduler.gateways[GATEWAY] = now - 60
        h.scheduler.hearing._hearing_since = now - 60  # we heard well all along
        await h.scheduler.reap_gateways()
        assert not h.scheduler.held

    asyncio.run(scenario())


def test_the_queue_is_bounded_and_plain_pd_and_fixed_ratios_never_hold() -> None:
    async def scenario() -> None:
        h = Harness(max_queued_requests=1)
        await h.heartbeats()
        for i in range(6):
            await h.submit(f"r{i}")
        assert list(h.scheduler.held) == ["r5"]
        refused = await h.submit("r6")
        assert not refused.accepted and refused.status == 429 and "queue is full" in refused.error

        fixed = Harness(offload_ratio="0.5")
        await fixed.heartbeats()
        answers = [await fixed.submit(f"r{i}") for i in range(8)]
        assert not fixed.scheduler.held
        assert all(a.accepted and a.decode_id == "decode-0" for a in answers[:2])
        # past the executor's room and the decode's KV: refused at once, as without a queue
        assert any(not a.accepted and a.status == 429 for a in answers)

    asyncio.run(scenario())


def test_a_held_request_is_refused_once_nothing_in_flight_can_make_room() -> None:
    """Held requests wait for room that requests in flight will free. When every KV cache shows full
    and nothing of ours is in flight (the room is held by what this scheduler does not know of), a
    held request would wait for nothing: it ends with the 429's reason instead."""

    async def scenario() -> None:
        h = Harness()
        await h.heartbeats()
        for i in range(7):
            await h.submit(f"r{i}")
        assert list(h.scheduler.held) == ["r5", "r6"]
        await h.heartbeats(free=False)  # every block taken, by what the scheduler does not track
        for i in range(4):
            await h.finish(f"r{i}")
            assert list(h.scheduler.held) == ["r5", "r6"]  # r4 in flight may still free room
        await h.finish("r4")
        assert not h.scheduler.held and len(h.bus.tasks) == 5
        failed = [(e.request_id, e.error) for e in h.bus.events() if e.finish_reason == "error"]
        assert [rid for rid, _ in failed] == ["r5", "r6"] and all("full" in error for _, error in failed)

    asyncio.run(scenario())

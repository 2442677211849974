"""What a decode instance does between steps: the executor wait it reports decays to "unknown",
the requests waiting for a step are kept alive at their gateways (prefill instances and the
scheduler do the same with `common.keepalive.KeepAlive`), and which hand-offs wait for room."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from common.bus import Bus
from common.config import EngineConfig
from common.engine import Engine
from common.keepalive import KeepAlive
from common.messages import KEEPALIVE_S, Ack, KVHandoff, Sampling, SubmitRequest, TokenBatch
from common.request import Request
from common.sampling import SamplingParams
from common.tensor_channel import TensorChannel
from services.decode.service import STALL_TTL_S, DecodeService, stall_estimate
from services.runtime import InstanceSettings, waiting_at


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


def test_an_offloaded_hand_off_does_not_wait_behind_requests_queued_here_for_blocks(llama_dir: Path) -> None:
    """Requests queued here to be recomputed (preempted, or handed back by a full executor) come
    first for this instance's blocks, so a hand-off whose KV comes here waits behind them. An
    offloaded request's KV stays on its executor and takes no block here: it joins the batch at
    once. It used to wait too, and then be queued to recompute here, its executor's copy freed:
    on the memory-bound benchmark, every offloaded request admitted while one waited here."""
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    settings = InstanceSettings(model=str(llama_dir), instance_id="decode-0")
    bus = SimpleNamespace(publish=lambda subject, message: asyncio.sleep(0))
    channel = SimpleNamespace(address=b"")  # no KV arrives in this test: no UCX worker needed
    service = DecodeService(settings, engine, cast(Bus, bus), cast(TensorChannel, channel))
    engine.add_waiting("queued", [3, 4, 5], 6, SamplingParams(max_new_tokens=4))

    def handoff(rid: str, **executor: object) -> KVHandoff:
        submit = SubmitRequest(rid, [7, 8, 9], Sampling(max_new_tokens=4), "test.tokens")
        return KVHandoff(submit, 10, 3, 1, b"prefill", **executor)  # type: ignore[arg-type]

    async def accept(h: KVHandoff) -> Ack | None:
        service.held[h.request.request_id] = time.monotonic() + 60  # may still wait for room
        return await service._accept(h)

    offloaded = asyncio.run(accept(handoff("off", executor_id="executor-0", executor_address=b"executor")))
    assert offloaded == Ack(True)
    assert engine.requests["off"].executor == "executor-0" and "off" not in engine.blocks
    assert asyncio.run(accept(handoff("local"))) is None  # its KV needs blocks: behind "queued"
    assert "local" not in engine.requests and "local" not in service.pending

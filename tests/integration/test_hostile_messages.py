"""No service dies or wedges on any control message a peer could send.

A live cluster (scheduler, prefill with its attention executor, decode) gets a few hundred
hypothesis-made messages on every subject each service listens to, and as many step
announcements sent to the executor over UCX: well typed with values chosen to break things,
plus broken shapes (`tests/message_strategies.py`) and frames whose length lies. Generation is
derandomized. One thing is held back: UCX worker addresses are drawn from the cluster's own,
since UCX aborts the process on some malformed ones (an assertion inside UCX, which no check of
ours can foresee); until the control plane is authenticated, any NATS client can do that.
Afterwards every process must be alive, serve requests exactly as it did before, and hold no
KV once the fake requests are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

from common import announce
from common.messages import (
    AbortRequest,
    Admitted,
    GatewayHeartbeat,
    InstanceLoad,
    KVHandoff,
    MessageError,
    PrefillTask,
    ReleaseKV,
    Sampling,
    StatusRequest,
    StepBegin,
    SubmitRequest,
    TokenBatch,
    decode,
)
from common.subjects import Subjects
from common.tags import announce_tag, step_tag_base
from common.tensor_channel import TensorChannel, TransferError
from tests.integration.cluster import PREFIX, BackendCluster, Client
from tests.message_strategies import packed, wire_bodies

MESSAGES_PER_SUBJECT = 400
VALID_AT_LEAST = 5  # per subject: messages that decode and so reach a service's logic


def hostile(cls: type[Any], count: int, addresses: tuple[bytes, ...]) -> list[bytes]:
    """`count` wire messages of type `cls`, the same ones every run for the same `addresses`."""
    found: list[bytes] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(wire_bodies(cls, addresses))
    def collect(body: dict[str, Any]) -> None:
        found.append(packed(cls, body))

    collect()
    return found


def request_ids(message: Any) -> set[str]:
    """The request ids a message names, to abort them afterwards."""
    if isinstance(message, SubmitRequest):
        return {message.request_id}
    if isinstance(message, PrefillTask | KVHandoff):
        return {message.request.request_id}
    if isinstance(message, StepBegin):
        return set(message.request_ids)
    if isinstance(message, Admitted | ReleaseKV | AbortRequest):
        return {message.request_id}
    return set()


def sift(cls: type[Any], messages: list[bytes]) -> set[str]:
    """The request ids that the messages which decode name, to abort them afterwards; fails unless
    at least VALID_AT_LEAST of them decode (else the test would test little)."""
    named: set[str] = set()
    valid = 0
    for data in messages:
        try:
            named |= request_ids(decode(data, cls))
            valid += 1
        except MessageError:
            pass
    assert valid >= VALID_AT_LEAST, f"only {valid} {cls.__name__} messages decode: the test would test little"
    return named


async def announce_hostile_steps(client: Client, addresses: tuple[bytes, ...]) -> set[str]:
    """Step announcements go over UCX to the executor (common.announce): the same hostile bodies
    framed, plus frames whose length field lies and one larger than the executor's buffer."""
    executor = next(load for load in client.loads.values() if load.role == "executor")
    channel = await TensorChannel.create()
    messages = hostile(StepBegin, MESSAGES_PER_SUBJECT, addresses)
    named = sift(StepBegin, messages)
    frames = [len(data).to_bytes(4, "big") + data for data in messages]
    frames += [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x00\x09abc", bytes(announce.MAX_BYTES + 8)]
    try:
        peer = await channel.connect(executor.ucx_address)
        for i, frame in enumerate(frames):
            tensor = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
            with contextlib.suppress(TransferError):  # the oversized one may fail on this side too
                await channel.send(peer, announce_tag(step_tag_base("fuzz", 0, i)), [tensor], timeout=10)
    finally:
        await channel.close()
    return named


@pytest.fixture(scope="module")
def cluster(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendCluster]:
    c = BackendCluster(llama_dir, tmp_path_factory.mktemp("logs"), executors=True, offload_ratio=0.5)
    c.start()
    yield c
    c.stop()


@pytest.mark.timeout(240)
def test_no_service_dies_or_wedges_on_any_message(cluster: BackendCluster) -> None:
    s = Subjects(PREFIX)
    targets: list[tuple[str, type[Any]]] = [
        (s.submit, SubmitRequest),
        (s.status, StatusRequest),
        (s.admitted, Admitted),
        (s.abort, AbortRequest),
        (s.tokens("fuzz"), TokenBatch),
        (s.load_of("prefill"), InstanceLoad),
        (s.load_of("decode"), InstanceLoad),
        (s.load_of("executor"), InstanceLoad),
        (s.instance("prefill-0", "prefill"), PrefillTask),
        (s.instance("decode-0", "handoff"), KVHandoff),
        (s.instance("executor-0", "handoff"), KVHandoff),
        (s.instance("executor-0", "release"), ReleaseKV),
        (s.gateway_heartbeat, GatewayHeartbeat),
    ]
    sampling = Sampling(max_new_tokens=12, temperature=0.0)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31, 32]]

    async def serve_all(client: Client, tag: str) -> list[list[int]]:
        for i, prompt in enumerate(prompts):
            reply = await client.submit_retrying(f"{tag}-{i}", prompt, sampling)
            assert reply.accepted, reply.error
        outputs = []
        for i in range(len(prompts)):
            tokens, last = await client.result(f"{tag}-{i}", timeout=60)
            assert last.finish_reason == "length", last
            outputs.append(tokens)
        return outputs

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        client = await Client.connect(cluster.nats.url)
        await client.wait_ready(prefills=1, decodes=1, executors=1)
        before = await serve_all(client, "before")
        # UCX worker addresses are the cluster's own (and the empty one): a malformed address can
        # abort a process inside UCX, which only an authenticated control plane will prevent.
        addresses = (b"", *sorted({load.ucx_address for load in client.loads.values()}))
        named: set[str] = set()
        for subject, cls in targets:
            messages = hostile(cls, MESSAGES_PER_SUBJECT, addresses)
            named |= sift(cls, messages)
            for data in messages:
                await client.bus.client.publish(subject, data)
            await client.bus.flush()
        named |= await announce_hostile_steps(client, addresses)
        for request_id in named - {""}:
            if len(request_id) <= 256:
                await client.bus.publish(s.abort, AbortRequest(request_id, "hostile test over"))
        # fake instances from the heartbeats expire after dead_after_s (or the grace after a pause
        # of the scheduler's hearing); real ones beat again: until exactly the real ones are listed
        await client.wait_ready(prefills=1, decodes=1, executors=1)
        after = await serve_all(client, "after")
        # fake hand-offs hold blocks until their transfer timeout (5 s) ends them
        await client.wait_all_free(["prefill-0", "decode-0", "executor-0"], timeout=30)
        await client.bus.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert after == before
    assert not cluster.group.dead(), [(c.name, cluster.group.tail(c.name)) for c in cluster.group.dead()]

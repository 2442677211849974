"""No service dies or wedges on any control message a peer could send.

A live cluster (scheduler, prefill with its attention executor, decode) gets a few hundred
hypothesis-made messages on every subject each service listens to: well typed with values
chosen to break things, plus broken shapes (`tests/message_strategies.py`). Generation is
derandomized. One thing is held back: UCX worker addresses are drawn from the cluster's own,
since UCX aborts the process on some malformed ones (an assertion inside UCX, which no check of
ours can foresee); until the control plane is authenticated, any NATS client can do that.
Afterwards every process must be alive, serve requests exactly as it did before, and hold no
KV once the fake requests are aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

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
        (s.instance("executor-0", "step"), StepBegin),
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
            valid = 0
            for data in hostile(cls, MESSAGES_PER_SUBJECT, addresses):
                try:
                    named |= request_ids(decode(data, cls))
                    valid += 1
                except MessageError:
                    pass
                await client.bus.client.publish(subject, data)
            await client.bus.flush()
            assert valid >= VALID_AT_LEAST, f"only {valid} {cls.__name__} messages decode: the test would test little"
        for request_id in named - {""}:
            if len(request_id) <= 256:
                await client.bus.publish(s.abort, AbortRequest(request_id, "hostile test over"))
        # fake instances from the heartbeats expire after dead_after_s; real ones beat again
        await asyncio.sleep(2.0)
        await client.wait_ready(prefills=1, decodes=1, executors=1)
        after = await serve_all(client, "after")
        # fake hand-offs hold blocks until their transfer timeout (5 s) ends them
        await client.wait_all_free(["prefill-0", "decode-0", "executor-0"], timeout=30)
        await client.bus.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert after == before
    assert not cluster.group.dead(), [(c.name, cluster.group.tail(c.name)) for c in cluster.group.dead()]

"""The control plane against a real nats-server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from nats.aio.msg import Msg

from common import nats_transport
from common.bus import Bus, Reply, ServiceUnavailable
from common.messages import AbortRequest, Sampling, SubmitReply, SubmitRequest
from common.natsd import NatsServer
from common.subjects import Subjects

SUBJECTS = Subjects("test")


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    with NatsServer() as server:
        yield server.url


def _submit(i: int) -> SubmitRequest:
    return SubmitRequest(f"r-{i}", [1, 2], Sampling(max_new_tokens=2), SUBJECTS.tokens("gw"))


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_request_reply_and_a_queue_group_spreads_work(nats_url: str) -> None:
    served: dict[str, list[str]] = {"a": [], "b": []}
    workers = []
    for name in served:
        bus = await Bus.connect(nats_url, f"scheduler-{name}")

        async def handle(msg: SubmitRequest, reply: Reply | None, name: str = name) -> None:
            served[name].append(msg.request_id)
            assert reply is not None
            await reply(SubmitReply(msg.request_id, accepted=True, decode_id=name))

        await bus.subscribe(SUBJECTS.submit, SubmitRequest, handle, queue="scheduler")
        await bus.flush()
        workers.append(bus)
    client = await Bus.connect(nats_url, "gateway")
    replies = await asyncio.gather(*(client.request(SUBJECTS.submit, _submit(i), SubmitReply, 2.0) for i in range(40)))
    assert [r.request_id for r in replies] == [f"r-{i}" for i in range(40)]
    assert all(r.accepted for r in replies)
    assert len(served["a"]) + len(served["b"]) == 40
    assert served["a"] and served["b"], "a queue group must spread requests over both members"
    for bus in [*workers, client]:
        await bus.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_nobody_listening_is_an_immediate_error(nats_url: str) -> None:
    client = await Bus.connect(nats_url, "gateway")
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="no instance is listening"):
        await client.request(SUBJECTS.instance("ghost", "prefill"), _submit(0), SubmitReply, timeout=5.0)
    assert time.monotonic() - start < 4.0  # NATS says "no responders" at once; we did not wait the 5 s
    await client.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_stuck_responder_is_a_timeout_not_a_hang(nats_url: str) -> None:
    stuck = await Bus.connect(nats_url, "stuck")

    async def never_answer(msg: SubmitRequest, reply: Reply | None) -> None:
        await asyncio.sleep(0)

    await stuck.subscribe(SUBJECTS.submit + ".stuck", SubmitRequest, never_answer)
    await stuck.flush()
    client = await Bus.connect(nats_url, "gateway")
    with pytest.raises(ServiceUnavailable, match=r"no reply within 0\.3 s"):
        await client.request(SUBJECTS.submit + ".stuck", _submit(0), SubmitReply, timeout=0.3)
    await client.close()
    await stuck.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_malformed_messages_are_dropped_and_the_subscriber_keeps_serving(nats_url: str) -> None:
    listener = await Bus.connect(nats_url, "listener")
    got: list[AbortRequest] = []

    async def on_abort(msg: AbortRequest, reply: Reply | None) -> None:
        got.append(msg)

    await listener.subscribe(SUBJECTS.abort, AbortRequest, on_abort)
    await listener.flush()
    sender = await Bus.connect(nats_url, "sender")
    await sender.client.publish(SUBJECTS.abort, b"garbage")
    await sender.publish(SUBJECTS.abort, _submit(1))  # well-formed, but the wrong type for this subject
    await sender.publish(SUBJECTS.abort, AbortRequest("r-9", "client gone"))
    await sender.flush()
    deadline = time.monotonic() + 30  # the valid message comes after the bad ones: once it is here, they were read
    while not got and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert got == [AbortRequest("r-9", "client gone")]
    assert listener.malformed == 2
    await sender.close()
    await listener.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_connections_use_small_segments_both_ways(nats_url: str) -> None:
    """common.nats_transport: the MSS is announced before connecting, so it bounds what the server
    sends us too; a message many segments long still arrives whole."""
    bus = await Bus.connect(nats_url, "decode")
    sock = bus.client._transport._io_writer.get_extra_info("socket")  # type: ignore[union-attr]
    assert 0 < sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= nats_transport.MSS_BYTES
    got: list[bytes] = []

    async def receive(msg: Msg) -> None:
        got.append(msg.data)

    sub = await bus.client.subscribe("big", cb=receive)
    payload = bytes(range(256)) * 1024  # 256 KiB: 32 segments or more each way
    await bus.client.publish("big", payload)
    await bus.flush()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert got == [payload]
    await sub.unsubscribe()
    await bus.close()

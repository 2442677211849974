"""The control plane's permissions, against a real nats-server run with `nats_auth.server_config`.

What a role may not do is shown by trying it: the server refuses, and the subscriber that the
message would have reached hears nothing (checked after a flush round trip and a message that
is allowed, so "nothing" is not just "not yet").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
import pytest_asyncio
from nats.errors import NoServersError

from common import nats_auth
from common.bus import Bus, NatsAuth
from common.messages import AbortRequest, TokenBatch, TokenEvent
from common.natsd import NatsServer
from common.subjects import Subjects

SUBJECTS = Subjects("authtest")
PASSWORDS = nats_auth.generate_passwords()


@pytest.fixture(scope="module")
def server() -> Iterator[NatsServer]:
    with NatsServer(config=nats_auth.server_config(PASSWORDS, SUBJECTS)) as s:
        yield s


async def _connect(server: NatsServer, user: str, errors: list[str] | None = None) -> Bus:
    bus = await Bus.connect(server.url, f"test-{user}", NatsAuth(user, PASSWORDS[user]))
    if errors is not None:
        # Permission violations come back asynchronously, to the client's error callback.
        bus.client._error_cb = _recorder(errors)
    return bus


def _recorder(errors: list[str]):  # type: ignore[no-untyped-def]
    async def record(exc: Exception) -> None:
        errors.append(str(exc))

    return record


@pytest_asyncio.fixture
async def gateway(server: NatsServer) -> AsyncIterator[tuple[Bus, asyncio.Queue[TokenEvent]]]:
    """A gateway's connection, listening on its token subject."""
    bus = await _connect(server, "gateway")
    heard: asyncio.Queue[TokenEvent] = asyncio.Queue()

    async def on_tokens(batch: TokenBatch, reply: object) -> None:
        for event in batch.events:
            heard.put_nowait(event)

    await bus.subscribe(SUBJECTS.tokens("gw-1"), TokenBatch, on_tokens)
    await bus.flush()
    yield bus, heard
    await bus.close()


def _event(request_id: str) -> TokenBatch:
    return TokenBatch([TokenEvent(request_id, [7])])


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_client_without_credentials_is_refused(server: NatsServer) -> None:
    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        await nats.connect(server.url, max_reconnect_attempts=0, connect_timeout=2, allow_reconnect=False)
    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        await nats.connect(server.url, user="decode", password="wrong", max_reconnect_attempts=0, allow_reconnect=False)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("intruder", ["attention_executor", "gateway", nats_auth.OBSERVER])
async def test_who_may_not_write_tokens_cannot_reach_a_gateway(
    server: NatsServer, gateway: tuple[Bus, asyncio.Queue[TokenEvent]], intruder: str
) -> None:
    _, heard = gateway
    errors: list[str] = []
    bus = await _connect(server, intruder, errors)
    decode = await _connect(server, "decode")
    try:
        await bus.publish(SUBJECTS.tokens("gw-1"), _event("forged"))
        await bus.flush()
        await decode.publish(SUBJECTS.tokens("gw-1"), _event("genuine"))  # decode may: the control case
        await decode.flush()
        first = await asyncio.wait_for(heard.get(), 10)
        assert first.request_id == "genuine", "the forged tokens reached the gateway"
        assert heard.empty()
        for _ in range(100):  # the server's -ERR arrives on the intruder's connection, after its flush
            if errors:
                break
            await bus.flush()
        assert any("permissions violation" in e.lower() for e in errors), errors
    finally:
        await bus.close()
        await decode.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["scheduler", "prefill", "decode", "attention_executor", nats_auth.OBSERVER])
async def test_only_gateways_read_completions(server: NatsServer, role: str) -> None:
    errors: list[str] = []
    bus = await _connect(server, role, errors)
    decode = await _connect(server, "decode")
    heard: list[TokenBatch] = []

    async def on_tokens(batch: TokenBatch, reply: object) -> None:
        heard.append(batch)

    try:
        await bus.subscribe(SUBJECTS.all_tokens, TokenBatch, on_tokens)
        await bus.flush()
        await decode.publish(SUBJECTS.tokens("gw-2"), _event("secret-completion"))
        await decode.flush()
        for _ in range(100):
            if errors:
                break
            await bus.flush()
        assert any("permissions violation" in e.lower() for e in errors), errors
        assert not heard
    finally:
        await bus.close()
        await decode.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_every_role_may_abort_and_be_heard(server: NatsServer) -> None:
    """The control case for the refusals above: what the code does is allowed."""
    scheduler = await _connect(server, "scheduler")
    heard: asyncio.Queue[str] = asyncio.Queue()

    async def on_abort(abort: AbortRequest, reply: object) -> None:
        heard.put_nowait(abort.request_id)

    await scheduler.subscribe(SUBJECTS.abort, AbortRequest, on_abort)
    await scheduler.flush()
    try:
        for role in nats_auth.ROLES:
            bus = await _connect(server, role)
            await bus.publish(SUBJECTS.abort, AbortRequest(f"from-{role}", "test"))
            await bus.close()
            assert await asyncio.wait_for(heard.get(), 10) == f"from-{role}"
    finally:
        await scheduler.close()


def test_the_permissions_name_only_subjects_under_the_prefix() -> None:
    for user in nats_auth.USERS:
        grant = nats_auth.permissions(user, SUBJECTS)
        for subject in (*grant.publish, *grant.subscribe):
            assert subject.startswith(f"{SUBJECTS.prefix}.") or subject.startswith(nats_auth.inbox_prefix(user))
        assert ">" not in grant.publish and f"{SUBJECTS.prefix}.>" not in grant.publish

"""TensorChannel over real UCX between this process and a child process (no mocks).

The child is this file run as `python -m tests.integration.test_tensor_channel SCENARIO`: it prints its
worker address (hex) on stdout and reads ours from stdin, so no pickling is involved anywhere.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY
from ucxx._lib.libucxx import UCXContext, UCXWorker

from common import settings_catalog as catalog
from common import tensor_channel
from common.tensor_channel import Peer, TensorChannel, TransferError, TransferTimeout
from tests.integration.ucx_workers import NeverArms

ROOT = Path(__file__).resolve().parents[2]
TAG_TO_PARENT, TAG_TO_CHILD, TAG_TOO_BIG, TAG_LATE, TAG_AFTER = 0x10, 0x20, 0x21, 0x30, 0x31
PING_TAG, PONG_TAG = 1 << 32, 2 << 32  # | iteration: one fresh tag per message, as the channel recommends
PING_WARMUP, PING_ITERS = 20, 100
PING_ELEMS, PONG_ELEMS = 24 * 1024 // 4, 8 * 1024 // 4  # float32: 24 KiB out, 8 KiB back


def samples() -> list[torch.Tensor]:
    """Mixed dtypes and shapes, one above UCX's 8 KiB rendezvous threshold, identical in both processes."""
    g = torch.Generator().manual_seed(1234)
    return [
        torch.randn(3, 5, generator=g),
        torch.randn(7, generator=g).to(torch.float16),
        torch.randint(-(2**62), 2**62, (2, 3, 4), generator=g, dtype=torch.int64),
        torch.randn(4, 4096, generator=g),
        torch.randn(2, 9, generator=g).to(torch.bfloat16),
    ]


# ---------------------------------------------------------------- child side


async def _read_line() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


def _spin_us() -> float:
    """ADRENALINE_UCX_SPIN_US, as a service would read it, so the ping-pong can be measured with a spin."""
    setting = catalog.UCX_SPIN_US
    return float(setting.value(os.environ.get(setting.env, "0"), setting.env))


async def _child_main(scenario: str) -> None:
    channel = await TensorChannel.create(spin_us=_spin_us())
    print(channel.address.hex(), flush=True)
    peer = await channel.connect(bytes.fromhex(await _read_line()))
    if scenario == "exchange":
        await channel.send(peer, TAG_TO_PARENT, samples())
        await channel.send(peer, TAG_TOO_BIG, [torch.ones(16)])
        got = [torch.zeros_like(t) for t in samples()]
        await channel.recv_into(TAG_TO_CHILD, got, timeout=10, peer=peer)
        print("ok" if all(torch.equal(a, b) for a, b in zip(got, samples(), strict=True)) else "mismatch", flush=True)
    elif scenario == "pingpong":
        ping, pong = torch.empty(PING_ELEMS), torch.empty(PONG_ELEMS)
        for i in range(PING_WARMUP + PING_ITERS):
            await channel.recv_into(PING_TAG | i, [ping], timeout=10, peer=peer)
            torch.add(ping[:PONG_ELEMS], 1.0, out=pong)
            await channel.send(peer, PONG_TAG | i, [pong])
    elif scenario == "late":
        assert await _read_line() == "go"
        await channel.send(peer, TAG_LATE, [torch.full((64,), 7.0)])
        await channel.send(peer, TAG_AFTER, [torch.full((64,), 8.0)])
    elif scenario == "sleep":
        print("ready", flush=True)
        await asyncio.sleep(3600)  # killed by the parent
    await _read_line()  # the parent says "bye" once it no longer needs us
    await channel.close()


# ---------------------------------------------------------------- parent side


@asynccontextmanager
async def connected(scenario: str) -> AsyncIterator[tuple[TensorChannel, Peer, asyncio.subprocess.Process]]:
    """Our channel, connected to a child running `scenario` that is connected back to us."""
    channel = await TensorChannel.create(spin_us=_spin_us())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.test_tensor_channel", scenario, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    try:
        peer = await channel.connect(bytes.fromhex((await read_line(proc)).strip()))
        proc.stdin.write(channel.address.hex().encode() + b"\n")
        await proc.stdin.drain()
        yield channel, peer, proc
        if proc.returncode is None:
            proc.stdin.write(b"bye\n")
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await channel.close()


async def read_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_tensors_cross_both_ways_exactly() -> None:
    async with connected("exchange") as (channel, peer, proc):
        got = [torch.zeros_like(t) for t in samples()]
        received = await channel.recv_into(TAG_TO_PARENT, got, timeout=10, peer=peer)
        for a, b in zip(got, samples(), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)
        assert received == sum(t.nbytes for t in samples())
        small = torch.zeros(8)
        with pytest.raises(TransferError, match="tag 0x21"):
            await channel.recv_into(TAG_TOO_BIG, [small], timeout=10, peer=peer)
        assert torch.equal(small, torch.zeros(8))
        assert await channel.send(peer, TAG_TO_CHILD, samples()) == received
        assert (await read_line(proc)).strip() == "ok"


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_ping_pong_latency() -> None:
    async with connected("pingpong") as (channel, peer, _):
        ping, pong = torch.randn(PING_ELEMS), torch.empty(PONG_ELEMS)
        rtts = []
        for i in range(PING_WARMUP + PING_ITERS):
            start = time.perf_counter()
            await channel.send(peer, PING_TAG | i, [ping])
            await channel.recv_into(PONG_TAG | i, [pong], timeout=10, peer=peer)
            rtts.append(time.perf_counter() - start)
            assert torch.equal(pong, ping[:PONG_ELEMS] + 1.0)
        measured = sorted(rtts[PING_WARMUP:])
        p99 = measured[min(len(measured) - 1, round(0.99 * len(measured)))]
        median = statistics.median(measured)
        print(f"\nping-pong 24 KiB out / 8 KiB back, {PING_ITERS} round trips: ", end="")
        print(f"median {median * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_idle_after_traffic_sleeps_instead_of_spinning() -> None:
    """After messages have moved, neither process may burn CPU while nothing moves (ucxx's own
    blocking mode spun a whole core here). CPU time, not wall time: a busy machine cannot fail it."""
    async with connected("pingpong") as (channel, peer, proc):
        ping, pong = torch.randn(PING_ELEMS), torch.empty(PONG_ELEMS)
        for i in range(PING_WARMUP + PING_ITERS):
            await channel.send(peer, PING_TAG | i, [ping])
            await channel.recv_into(PONG_TAG | i, [pong], timeout=10, peer=peer)
        await asyncio.sleep(0.2)  # let the child settle into its wait for "bye"
        ours, theirs = time.process_time(), _cpu_seconds(proc.pid)
        await asyncio.sleep(2.0)
        used_ours, used_theirs = time.process_time() - ours, _cpu_seconds(proc.pid) - theirs
        # a spinning loop uses ~2 s here; a sleeping one a few milliseconds
        assert used_ours < 0.2 and used_theirs < 0.2, (used_ours, used_theirs)


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_a_worker_that_never_arms_does_not_hold_the_event_loop() -> None:
    """Its progress passes come back on the loop's next turn: timers, other tasks and a receive's
    timeout still run (a pass that looped until `arm()` succeeded would freeze the process)."""
    context = UCXContext({})
    worker = UCXWorker(context, enable_delayed_submission=False, enable_python_future=False)
    channel = TensorChannel(context, NeverArms(worker), asyncio.get_running_loop())
    try:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            for _ in range(5):
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(tick())
        with pytest.raises(TransferTimeout):
            await channel.recv_into(7, [torch.empty(4)], timeout=0.3)
        await ticking
        assert ticks == 5
    finally:
        await channel.close()


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_silent_peer_times_out_and_buffer_stays_untouched() -> None:
    async with connected("late") as (channel, peer, proc):
        assert proc.stdin is not None
        buf = torch.full((64,), -1.0)
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match=r"tag 0x30.*0\.5 s") as info:
            await channel.recv_into(TAG_LATE, [buf], timeout=0.5, peer=peer)
        assert 0.5 <= time.monotonic() - start < 10.0  # it ends: the bound is no speed claim
        assert info.value.tag == TAG_LATE and info.value.timeout == 0.5
        assert torch.equal(buf, torch.full((64,), -1.0))
        # The message that arrives after the timeout is drained into the channel's staging buffer,
        # never into the caller's, and the channel keeps working.
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        after = torch.zeros(64)
        await channel.recv_into(TAG_AFTER, [after], timeout=10, peer=peer)
        assert torch.equal(after, torch.full((64,), 8.0))
        await asyncio.sleep(0.2)
        assert torch.equal(buf, torch.full((64,), -1.0))


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_killed_peer_times_out_instead_of_hanging() -> None:
    async with connected("sleep") as (channel, peer, proc):
        assert (await read_line(proc)).strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
        buf = torch.full((3, 4), 5, dtype=torch.int64)
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="tag 0x40"):
            await channel.recv_into(0x40, [buf, torch.zeros(8)], timeout=0.5, peer=peer)
        assert time.monotonic() - start < 10.0  # it ends: the bound is no speed claim
        assert torch.equal(buf, torch.full((3, 4), 5, dtype=torch.int64))
        # The receive stays posted for its dead peer until the TTL gives up on it (a clock set
        # forward, not waited for), rather than until the channel closes.
        assert channel.num_orphans == 1
        assert channel.expire_orphans(now=time.monotonic() + channel.orphan_ttl_s) == 1
        assert channel.num_orphans == 0
        start = time.monotonic()
    closing = time.monotonic() - start
    print(f"\nclosing a channel to a SIGKILLed peer took {closing * 1e3:.0f} ms")
    assert closing < 5.0, "closing a channel to a dead peer must not stall"


if __name__ == "__main__":
    asyncio.run(_child_main(sys.argv[1]))


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_the_endpoint_cache_is_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_channel, "MAX_PEERS", 2)
    hub = await TensorChannel.create()
    others = [await TensorChannel.create() for _ in range(3)]
    try:
        first = await hub.connect(others[0].address)
        await hub.connect(others[1].address)
        assert await hub.connect(others[0].address) is first  # used again: now the most recent
        await hub.connect(others[2].address)  # over the bound: others[1], the least recent, goes
        assert hub.num_peers == 2
        assert await hub.connect(others[0].address) is first
        again = await hub.connect(others[1].address)  # evicted, so connected anew: and it works
        got = torch.zeros(4)
        sent = asyncio.ensure_future(hub.send(again, 0x77, [torch.arange(4.0)], timeout=10))
        await others[1].recv_into(0x77, [got], timeout=10)
        await sent
        assert torch.equal(got, torch.arange(4.0))
    finally:
        for channel in (hub, *others):
            await channel.close()


def _expired(reason: str) -> float:
    return REGISTRY.get_sample_value("adrenaline_ucx_orphaned_transfers_expired_total", {"reason": reason}) or 0.0


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_orphaned_receives_are_given_up_on_past_the_cap_or_the_ttl() -> None:
    """Receives whose sender never came are held past their timeout (UCX may still fill them), but
    not for ever: the oldest past the cap, and every one past the TTL, are cancelled, counted, and
    their tag is free again: a message sent with it later reaches a new receive, not the old one."""
    hub, other = await TensorChannel.create(), await TensorChannel.create()
    try:
        peer = await other.connect(hub.address)
        for tag in (0x51, 0x52, 0x53):
            with pytest.raises(TransferTimeout):
                await hub.recv_into(tag, [torch.zeros(4096)], timeout=0.05)
        assert hub.num_orphans == 3
        cap, ttl = _expired("cap"), _expired("ttl")
        hub.max_orphans = 2
        assert hub.expire_orphans() == 1  # over the cap: the oldest (0x51) goes at once
        assert hub.num_orphans == 2 and _expired("cap") == cap + 1
        assert hub.expire_orphans(now=time.monotonic() + hub.orphan_ttl_s) == 2
        assert hub.num_orphans == 0 and _expired("ttl") == ttl + 2
        for tag in (0x51, 0x53):
            got = torch.zeros(4096)
            sent = asyncio.ensure_future(other.send(peer, tag, [torch.full((4096,), float(tag))], timeout=10))
            await hub.recv_into(tag, [got], timeout=10)
            await sent
            assert torch.equal(got, torch.full((4096,), float(tag)))
    finally:
        for channel in (hub, other):
            await channel.close()

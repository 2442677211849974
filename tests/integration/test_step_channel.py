"""The decode step thread's own UCX worker against an executor-like peer in another process:
answers arrive intact, a silent peer times out, a dead executor ends the wait, and one thread only
may use it. Run with `-s` to see the round-trip latency (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from common.tensor_channel import TensorChannel, TransferError, TransferTimeout
from services.decode import step_channel
from services.decode.step_channel import StepChannel
from tests.integration.ucx_workers import NeverArms

ROOT = Path(__file__).resolve().parents[2]
Q_ELEMS, OUT_ELEMS = 6144, 2048  # 24 KiB of q/k/v out, 8 KiB of attention output back, as per layer
WARMUP, ITERS = 20, 300


async def _executor_main() -> None:
    """Plays the executor: answers each layer's q/k/v on the same tag, to the address it is given."""
    channel = await TensorChannel.create()
    print(channel.address.hex(), flush=True)
    loop = asyncio.get_running_loop()
    peer = await channel.connect(bytes.fromhex(await loop.run_in_executor(None, sys.stdin.readline)))
    qkv, out = torch.empty(Q_ELEMS), torch.empty(OUT_ELEMS)
    for tag in range(1, WARMUP + ITERS + 1):
        await channel.recv_into(tag, [qkv], timeout=30)
        torch.add(qkv[:OUT_ELEMS], 1.0, out=out)
        await channel.send(peer, tag, [out])
    await loop.run_in_executor(None, sys.stdin.readline)  # "bye"
    await channel.close()


@contextmanager
def executor(step: StepChannel) -> Iterator[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_step_channel"], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        address = bytes.fromhex(proc.stdout.readline().decode().strip())
        proc.stdin.write(step.address.hex().encode() + b"\n")
        proc.stdin.flush()
        yield address
        proc.stdin.write(b"bye\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_layers_round_trip_intact_and_a_silent_peer_times_out() -> None:
    step = StepChannel()
    with executor(step) as address:
        endpoint = step.connect(address)
        rtts = []
        for tag in range(1, WARMUP + ITERS + 1):
            qkv, out = torch.randn(Q_ELEMS), torch.empty(OUT_ELEMS)
            started = time.perf_counter()
            recv = step.post_recv(tag, [out])
            send = step.post_send(endpoint, tag, [qkv])
            step.wait([recv, send], timeout=10, cancelled=lambda: "")
            rtts.append(time.perf_counter() - started)
            assert torch.equal(out, qkv[:OUT_ELEMS] + 1.0)
        median = statistics.median(rtts[WARMUP:])
        print(f"\nstep thread <-> executor loop, 24 KiB out / 8 KiB back: median {median * 1e6:.0f} us")
        # nobody sends on this tag: a timeout naming it, and the receive kept as an orphan
        started = time.monotonic()
        with pytest.raises(TransferTimeout, match="tag 0x7777"):
            step.wait([step.post_recv(0x7777, [torch.empty(4)])], timeout=0.2, cancelled=lambda: "")
        assert time.monotonic() - started >= 0.2 and step.orphans == 1


@pytest.mark.timeout(30)
def test_a_dead_executor_ends_the_wait_at_once_and_only_one_thread_may_use_it() -> None:
    step = StepChannel()
    reason = ""

    def declare_dead() -> None:  # as the decode's event loop does when heartbeats stop
        nonlocal reason
        time.sleep(0.1)
        reason = "no heartbeat for 1 s"

    threading.Thread(target=declare_dead).start()
    started = time.monotonic()
    with pytest.raises(TransferError, match="no heartbeat"):
        step.wait([step.post_recv(1, [torch.empty(4)])], timeout=30, cancelled=lambda: reason)
    assert time.monotonic() - started < 10  # the slice is 50 ms; far from the 30 s timeout
    refused: list[RuntimeError] = []

    def use_from_another_thread() -> None:
        try:
            step.post_recv(2, [torch.empty(4)])
        except RuntimeError as exc:
            refused.append(exc)

    other = threading.Thread(target=use_from_another_thread)
    other.start()
    other.join()
    assert len(refused) == 1 and "thread" in str(refused[0])


@pytest.mark.timeout(30)
def test_a_worker_that_never_arms_still_ends_the_wait() -> None:
    """Cancellation and the deadline are looked at on every pass, not only before a sleep (a
    decode instance once waited minutes on a killed executor, past its transfer timeout)."""
    step = StepChannel()
    step._worker = NeverArms(step._ready())
    started = time.monotonic()
    with pytest.raises(TransferTimeout):
        step.wait([step.post_recv(1, [torch.empty(4)])], timeout=0.2, cancelled=lambda: "")
    assert time.monotonic() - started < 5
    with pytest.raises(TransferError, match="gone"):
        step.wait([step.post_recv(2, [torch.empty(4)])], timeout=30, cancelled=lambda: "gone")


def test_abandoned_receives_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead executor's receives stay posted (UCX may still fill them) but not for ever: past the
    cap the oldest are given up on, and any after the TTL."""
    monkeypatch.setattr(step_channel, "MAX_ORPHANS", 2)
    step = StepChannel()
    for tag in (1, 2, 3):
        with pytest.raises(TransferTimeout):
            step.wait([step.post_recv(tag, [torch.empty(4)])], timeout=0.01, cancelled=lambda: "")
    assert step.orphans == 2
    monkeypatch.setattr(step_channel, "ORPHAN_TTL_S", 0.0)
    with pytest.raises(TransferTimeout):
        step.wait([step.post_recv(4, [torch.empty(4)])], timeout=0.01, cancelled=lambda: "")
    assert step.orphans == 0


def test_transfers_nobody_waits_for_stay_with_the_channel() -> None:
    """A failed step drops its later layers' transfers unwaited, and whatever held them may be
    freed on the event loop's thread: the channel keeps them (and the buffers UCX may fill) so
    that only its own thread ever lets an unfinished one go."""
    step = StepChannel()
    buffer = torch.empty(4)
    posted = step.post_recv(5, [buffer])
    request = posted.requests[0]
    del posted
    assert step.orphans == 1 and not request.completed
    assert sys.getrefcount(buffer) > 2  # still referenced by the kept transfer, beyond our name and the call


if __name__ == "__main__":
    asyncio.run(_executor_main())

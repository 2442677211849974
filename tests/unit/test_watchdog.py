"""The loop watch (`common.watchdog`): the evidence a hang leaves in a service's log."""

from __future__ import annotations

import asyncio
import faulthandler
import time

import pytest

from common.watchdog import WorkClock, watch_loop


def test_stuck_work_has_the_stacks_dumped_once(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work stuck in a worker thread leaves the event loop running: the watch dumps every
    thread's stack once for that work, and not while it is young."""
    monkeypatch.setattr(faulthandler, "enable", lambda *args, **kwargs: None)  # pytest's own stays
    work = WorkClock()

    async def scenario() -> None:
        watch = asyncio.create_task(watch_loop(work, tick_s=0.01, stuck_s=0.5))
        try:
            work.since = time.monotonic()  # work that just began: not stuck yet
            await asyncio.sleep(0.05)
            assert "Thread 0x" not in capfd.readouterr().err
            await asyncio.sleep(1.0)  # now past stuck_s, for many ticks
        finally:
            watch.cancel()

    asyncio.run(scenario())
    dumped = capfd.readouterr().err
    assert dumped.count("Current thread 0x") == 1 and "in watch_loop" in dumped


def test_a_stalled_loop_has_the_stacks_dumped(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop blocked past `stall_s` cannot dump for itself: faulthandler's thread does, showing
    where the loop is stuck."""
    monkeypatch.setattr(faulthandler, "enable", lambda *args, **kwargs: None)

    def blocking_call() -> None:
        time.sleep(0.5)

    async def scenario() -> None:
        watch = asyncio.create_task(watch_loop(stall_s=0.2, tick_s=0.01))
        try:
            await asyncio.sleep(0.03)
            blocking_call()  # holds the loop
            await asyncio.sleep(0.03)
        finally:
            watch.cancel()

    asyncio.run(scenario())
    assert "in blocking_call" in capfd.readouterr().err

"""A process's watch over its own event loop and over the work it hands to a thread.

A service whose loop is blocked (a native call that never returns, a lock never released) stops
heartbeating and is judged dead with no word of why; one whose worker thread is stuck keeps
heartbeating while its requests stop. Either way the evidence is every thread's Python stack at
that moment, which `watch_loop` writes to stderr (the service's log).
"""

from __future__ import annotations

import asyncio
import faulthandler
import sys
import time
from dataclasses import dataclass

import structlog

log = structlog.get_logger("watchdog")

LOOP_STALL_S = 10.0  # an event loop that runs nothing for this long has every thread's stack dumped
WORK_STUCK_S = 30.0  # work running this long in a worker thread has every thread's stack dumped, once


@dataclass
class WorkClock:
    """When the work now running in a worker thread began (monotonic); 0 while none runs. Set by
    whoever hands the work over (an engine step: `services.runtime.step`), read by `watch_loop`."""

    since: float = 0.0


async def watch_loop(
    work: WorkClock | None = None,
    stall_s: float = LOOP_STALL_S,
    tick_s: float = 1.0,
    stuck_s: float = WORK_STUCK_S,
) -> None:
    """Dump every thread's stack when the event loop stalls for `stall_s`, or once per piece of
    `work` that runs past `stuck_s`; run it as a task for the process's life.

    faulthandler's own thread, which needs neither the loop nor the GIL, dumps the stacks once
    `stall_s` pass without this task re-arming it; when the loop comes back, the stall's length
    is logged. A process paused with SIGSTOP and continued reports a stall too, which is what it
    was. Stuck work leaves the loop running: the loop looks at `work` each tick.
    """
    faulthandler.enable(sys.stderr)  # a crash in native code shows its Python stack as well
    reported = 0.0  # the stuck work already dumped (its `since`)
    try:
        while True:
            faulthandler.dump_traceback_later(stall_s, exit=False, file=sys.stderr)
            start = time.monotonic()
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            late = now - start - tick_s
            if late > tick_s:
                log.warning("event loop stalled", seconds=round(late, 2))
            since = work.since if work is not None else 0.0
            if since and now - since > stuck_s and since != reported:
                reported = since
                log.warning("worker thread stuck", seconds=round(now - since, 1))  # or merely long: the stacks tell
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    finally:
        faulthandler.cancel_dump_traceback_later()

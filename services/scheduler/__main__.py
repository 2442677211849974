"""`python -m services.scheduler`: the scheduler (run one; a queue group lets more share the load)."""

from __future__ import annotations

import asyncio
import sys

from common import metrics
from common.bus import Bus
from common.logging import configure
from services.runtime import run_until_signalled
from services.scheduler.service import Scheduler, SchedulerSettings


def main(argv: list[str] | None = None) -> None:
    settings = SchedulerSettings.parse(argv)
    configure("scheduler", settings.log_level)
    metrics.serve(settings.metrics_port, settings.metrics_host)

    async def serve(stop: asyncio.Event) -> None:
        bus = await Bus.connect(settings.nats_url, "scheduler", settings.nats)
        try:
            await Scheduler(settings, bus).serve(stop)
        finally:
            await bus.close()

    run_until_signalled(serve)


if __name__ == "__main__":
    main(sys.argv[1:])

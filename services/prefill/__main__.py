"""`python -m services.prefill`: one prefill instance."""

from __future__ import annotations

import asyncio
import sys

from common import metrics
from common.bus import Bus
from common.logging import configure
from common.tensor_channel import TensorChannel
from services.prefill.service import PrefillService
from services.runtime import InstanceSettings, build_engine, run_until_signalled


def main(argv: list[str] | None = None) -> None:
    settings = InstanceSettings.parse(argv, "prefill")
    configure("prefill").bind(instance_id=settings.instance_id)
    settings.apply_threads()
    engine = build_engine(settings)
    metrics.serve(settings.metrics_port)

    async def serve(stop: asyncio.Event) -> None:
        bus = await Bus.connect(settings.nats_url, settings.instance_id)
        channel = await TensorChannel.create()
        try:
            await PrefillService(settings, engine, bus, channel).serve(stop)
        finally:
            await bus.close()
            await channel.close()

    run_until_signalled(serve)


if __name__ == "__main__":
    main(sys.argv[1:])

"""`python -m services.attention_executor`: one attention executor, beside its prefill instance."""

from __future__ import annotations

import asyncio
import sys

import torch

from common import metrics
from common.kv_pool import KVLayout
from common.logging import configure
from common.model.spec import ModelSpec
from common.offload import ExecutorCore
from kernels.backend import default_backend
from services.attention_executor.service import ExecutorService
from services.runtime import InstanceSettings, connect, run_until_signalled


def main(argv: list[str] | None = None) -> None:
    settings = InstanceSettings.parse(argv, "attention_executor")
    configure("attention_executor", settings.log_level).bind(instance_id=settings.instance_id)
    settings.apply_threads()
    spec = ModelSpec.from_folder(settings.model)  # shapes only: an executor loads no weights
    device = torch.device(settings.device)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, settings.block_size, spec.dtype)
    core = ExecutorCore(
        layout,
        layout.blocks_for_budget(settings.kv_cache_bytes),
        default_backend(device),
        spec.head_dim**-0.5,
        device,
    )
    metrics.name_model(settings.model)
    metrics.serve(settings.metrics_port, settings.metrics_host)

    async def serve(stop: asyncio.Event) -> None:
        bus, channel = await connect(settings)
        try:
            await ExecutorService(settings, spec, core, bus, channel).serve(stop)
        finally:
            await bus.close()
            await channel.close()

    run_until_signalled(serve)


if __name__ == "__main__":
    main(sys.argv[1:])

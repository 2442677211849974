"""Offloading through the services: prefill -> attention executor KV hand-off, and per-layer q/k/v
round trips between decode and executor processes over UCX, at fixed offload ratios."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.messages import Sampling
from tests.integration.cluster import BackendCluster, Client


def _prompts(n: int, seed: int = 8) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 50, (n,), generator=gen).tolist()
    return [torch.randint(3, 384, (length,), generator=gen).tolist() for length in lengths]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("ratio", "prefills"), [(1.0, 1), (0.5, 2), (1.0, 2)])
def test_offloaded_greedy_equals_transformers(llama_dir: Path, tmp_path: Path, ratio: float, prefills: int) -> None:
    cluster = BackendCluster(llama_dir, tmp_path, prefills=prefills, decodes=2, executors=True, offload_ratio=ratio)
    cluster.start()
    prompts = _prompts(12)
    sampling = Sampling(max_new_tokens=24, temperature=0.0)
    instances = [f"prefill-{i}" for i in range(prefills)] + ["decode-0", "decode-1"]
    instances += [f"executor-{i}" for i in range(prefills)]
    try:

        async def scenario() -> tuple[list[list[int]], int]:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=prefills, decodes=2, executors=prefills)
            replies = await asyncio.gather(*(client.submit(f"o{i}", p, sampling) for i, p in enumerate(prompts)))
            assert all(r.accepted for r in replies), [r.error for r in replies]
            results = [await client.result(f"o{i}") for i in range(len(prompts))]
            assert all(last.finish_reason in ("length", "stop") for _, last in results), results
            await client.wait_all_free(instances)
            await client.bus.close()
            return [tokens for tokens, _ in results], sum(r.offloaded for r in replies)

        outputs, offloaded = asyncio.run(scenario())
    finally:
        cluster.stop()
    assert offloaded == round(len(prompts) * ratio)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    for prompt, tokens in zip(prompts, outputs, strict=True):
        assert (
            tokens == hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
        )

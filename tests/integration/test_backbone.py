"""Scheduler, prefill and decode as separate processes over real NATS and real UCX."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.messages import Sampling
from tests.integration.cluster import BackendCluster, Client


def _prompts(n: int, vocab: int = 384, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(length),), generator=gen).tolist()
        for length in torch.randint(2, 60, (n,), generator=gen)
    ]


def _hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(folder)
    return [
        hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(p) :].tolist()
        for p in prompts
    ]


@pytest.fixture(scope="module")
def cluster(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendCluster]:
    c = BackendCluster(llama_dir, tmp_path_factory.mktemp("logs"), prefills=2, decodes=2)
    c.start()
    yield c
    c.stop()


@pytest.mark.timeout(180)
def test_disaggregated_greedy_equals_transformers_on_every_replica(cluster: BackendCluster, llama_dir: Path) -> None:
    prompts = _prompts(16)
    sampling = Sampling(max_new_tokens=24, temperature=0.0)

    async def scenario() -> tuple[list[list[int]], set[str], set[str]]:
        client = await Client.connect(cluster.nats.url)
        await client.wait_ready(prefills=2, decodes=2)
        replies = await asyncio.gather(*(client.submit(f"r{i}", p, sampling) for i, p in enumerate(prompts)))
        assert all(r.accepted for r in replies), [r.error for r in replies if not r.accepted]
        results = [await client.result(f"r{i}") for i in range(len(prompts))]
        await client.wait_all_free(["prefill-0", "prefill-1", "decode-0", "decode-1"])
        await client.bus.close()
        return [tokens for tokens, _ in results], {r.prefill_id for r in replies}, {r.decode_id for r in replies}

    outputs, prefills, decodes = asyncio.run(scenario())
    assert outputs == _hf_greedy(llama_dir, prompts, 24)
    assert prefills == {"prefill-0", "prefill-1"}
    assert decodes == {"decode-0", "decode-1"}

"""Offloading through the services: prefill -> attention executor KV hand-off, and per-layer q/k/v
round trips between decode and executor processes over UCX, at fixed offload ratios."""

from __future__ import annotations

import asyncio
import time
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
@pytest.mark.parametrize(("ratio", "prefills"), [(1.0, 1), (0.5, 2), (1.0, 2), ("auto", 1), ("auto", 2)])
def test_offloaded_greedy_equals_transformers(
    llama_dir: Path, tmp_path: Path, ratio: float | str, prefills: int
) -> None:
    """Fixed ratios, and the auto policy with each decode instance's KV capped at 384 tokens (about
    five of these requests at their full length), so that memory pressure makes it offload."""
    decode_kv = 384 * 512 if ratio == "auto" else 64 * 2**20
    cluster = BackendCluster(
        llama_dir,
        tmp_path,
        prefills=prefills,
        decodes=2,
        executors=True,
        offload_ratio=ratio,
        decode_kv_bytes=decode_kv,
    )
    cluster.start()
    prompts = _prompts(12)
    sampling = Sampling(max_new_tokens=24, temperature=0.0)
    instances = [f"prefill-{i}" for i in range(prefills)] + ["decode-0", "decode-1"]
    instances += [f"executor-{i}" for i in range(prefills)]
    try:

        async def scenario() -> tuple[list[list[int]], int]:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=prefills, decodes=2, executors=prefills)
            replies = await asyncio.gather(
                *(client.submit_retrying(f"o{i}", p, sampling) for i, p in enumerate(prompts))
            )
            assert all(r.accepted for r in replies), [r.error for r in replies]
            results = [await client.result(f"o{i}") for i in range(len(prompts))]
            assert all(last.finish_reason in ("length", "stop") for _, last in results), results
            await client.wait_all_free(instances)
            await client.bus.close()
            return [tokens for tokens, _ in results], sum(r.offloaded for r in replies)

        outputs, offloaded = asyncio.run(scenario())
        decisions = {
            k: v
            for k, v in cluster.metrics("scheduler").items()
            if "offload_decisions_total{" in k or "offload_bound{" in k
        }
    finally:
        cluster.stop()
    if ratio == "auto":
        assert 0 < offloaded < len(prompts), decisions
        offload_reasons = sum(v for k, v in decisions.items() if 'offloaded="true"' in k)
        assert offload_reasons == offloaded, decisions
    else:
        assert offloaded == round(len(prompts) * float(ratio))
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    for prompt, tokens in zip(prompts, outputs, strict=True):
        assert (
            tokens == hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
        )


@pytest.mark.timeout(180)
def test_a_killed_executor_fails_only_its_requests(llama_dir: Path, tmp_path: Path) -> None:
    cluster = BackendCluster(llama_dir, tmp_path, prefills=1, decodes=1, executors=True, offload_ratio=0.5)
    cluster.start()
    long = Sampling(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    try:

        async def scenario() -> None:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=1, decodes=1, executors=1)
            replies = [await client.submit(f"x{i}", _prompts(1, seed=i)[0], long) for i in range(4)]
            victims = {r.request_id for r in replies if r.offloaded}
            assert len(victims) == 2
            while not all(len(client.events[r.request_id]) >= 5 for r in replies):
                await asyncio.sleep(0.01)
            survivors = [r.request_id for r in replies if r.request_id not in victims]
            seen = {rid: len(client.events[rid]) for rid in survivors}
            killed = time.monotonic()
            cluster.group.kill("executor-0")
            # The decode instance notices the silence (dead_after_s, 1 s) and cancels the round trip
            # its step waits on, well before the 5 s transfer timeout would end it.
            while not all(len(client.events[rid]) >= seen[rid] + 2 for rid in survivors):
                await asyncio.sleep(0.01)
            assert time.monotonic() - killed < 3.5
            for rid in victims:
                _, last = await client.result(rid, timeout=15)
                assert last.finish_reason == "error" and "executor-0" in last.error
            for r in replies:
                if r.request_id not in victims:
                    tokens, last = await client.result(r.request_id, timeout=120)
                    assert last.finish_reason == "length" and len(tokens) == 1500
            await client.wait_ready(prefills=1, decodes=1, executors=0)
            after = await client.submit("after", _prompts(1)[0], Sampling(max_new_tokens=8, temperature=0.0))
            assert after.accepted and not after.offloaded
            tokens, _ = await client.result("after")
            assert len(tokens) == 8
            await client.wait_all_free(["prefill-0", "decode-0"])
            await client.bus.close()

        asyncio.run(scenario())
    finally:
        cluster.stop()

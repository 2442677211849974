"""Scheduler, prefill and decode as separate processes over real NATS and real UCX."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.kv_pool import KVLayout
from common.messages import AbortRequest, Sampling, TokenEvent
from common.model.spec import ModelSpec
from common.model.tiny import make_tiny
from services.runtime import PROMPT_LOGPROB_VALUES
from tests.integration.cluster import PREFIX, BackendCluster, Client


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
    label = f'{{model_name="{llama_dir.name}"}}'
    for decode in ("decode-0", "decode-1"):
        scraped = cluster.metrics(decode)
        assert scraped['adrenaline_kv_transfer_bytes_total{direction="recv"}'] > 0
        assert scraped["adrenaline_step_seconds_count"] > 0
        assert scraped["adrenaline_kv_blocks_used"] == 0
        # vLLM's names, for dashboards built for vLLM
        assert scraped[f"vllm:num_requests_running{label}"] == 0
        assert scraped[f"vllm:num_requests_waiting{label}"] == 0
        assert scraped[f"vllm:kv_cache_usage_perc{label}"] == 0


@pytest.mark.timeout(120)
def test_prompt_logprobs_come_from_the_prefill_instance_and_equal_transformers(
    cluster: BackendCluster, llama_dir: Path
) -> None:
    """The prefill instance, which runs the prompt's forward pass, sends each prompt token's logprob
    and its 20 most likely tokens (a 900-token prompt's take two messages) before the first token;
    they equal log_softmax of transformers' logits on the prompt. A request that does not ask gets none."""
    long = torch.randint(3, 384, (900,), generator=torch.Generator().manual_seed(12)).tolist()
    prompts = [[7], *_prompts(2, seed=11), long]  # one token: nothing before it, so no logprob to send
    asked = Sampling(max_new_tokens=3, temperature=0.0, logprobs=1, prompt_logprobs=20)

    async def scenario() -> dict[str, list[TokenEvent]]:
        client = await Client.connect(cluster.nats.url)
        await client.wait_ready(prefills=2, decodes=2)
        submits = [client.submit(f"pl{i}", p, asked) for i, p in enumerate(prompts)]
        replies = await asyncio.gather(*submits, client.submit("plain", prompts[0], Sampling(max_new_tokens=3)))
        assert all(r.accepted for r in replies), [r.error for r in replies if not r.accepted]
        for reply in replies:
            await client.result(reply.request_id)
        await client.bus.close()
        return client.events

    events = asyncio.run(scenario())
    assert not any(e.prompt_logprobs for e in events["plain"])
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    for i, prompt in enumerate(prompts):
        mine = events[f"pl{i}"]
        ahead = mine[: next(j for j, e in enumerate(mine) if e.token_ids)]  # all of them precede the first token
        logprobs = [x for e in ahead for x in e.prompt_logprobs]
        top = [row for e in ahead for row in e.prompt_top_logprobs]
        assert len(logprobs) == len(top) == len(prompt) - 1
        assert len(ahead) == -(-(len(prompt) - 1) // (PROMPT_LOGPROB_VALUES // 21))  # 0, 1, 1 and 2
        with torch.no_grad():
            expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
        gathered = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs), gathered, atol=1e-4, rtol=0)
        values, indices = expected.topk(20, dim=-1)
        assert [[t for t, _ in row] for row in top] == indices.tolist()
        got = torch.tensor([v for row in top for _, v in row]).reshape(-1, 20)
        torch.testing.assert_close(got, values, atol=1e-4, rtol=0)


@pytest.mark.timeout(120)
def test_aborts_free_kv_everywhere_and_bad_requests_are_refused(cluster: BackendCluster) -> None:
    long = Sampling(max_new_tokens=1500, temperature=0.0, ignore_eos=True)

    async def scenario() -> None:
        client = await Client.connect(cluster.nats.url)
        await client.wait_ready(prefills=2, decodes=2)
        # Aborted while decoding.
        for i in range(3):
            assert (await client.submit(f"a{i}", _prompts(1, seed=i)[0], long)).accepted
        while not all(len(client.events[f"a{i}"]) >= 3 for i in range(3)):
            await asyncio.sleep(0.01)
        # Aborted before its first token: it may still be queued, prefilling, or its KV in flight.
        assert (await client.submit("early", _prompts(1, seed=9)[0], long)).accepted
        for rid in ("a0", "a1", "a2", "early"):
            await client.bus.publish(client.subjects.abort, AbortRequest(rid, "client disconnected"))
        await client.wait_all_free(["prefill-0", "prefill-1", "decode-0", "decode-1"])
        assert not any(e.finish_reason == "length" for rid in ("a0", "a1", "a2") for e in client.events[rid])
        # A request the model cannot serve is refused up front, naming the problem.
        reply = await client.submit("bad", [5, 99999], Sampling(max_new_tokens=4))
        assert not reply.accepted and reply.status == 400 and "vocabulary" in reply.error
        await client.bus.close()

    asyncio.run(scenario())


@pytest.mark.timeout(180)
def test_a_killed_decode_instance_fails_its_requests_and_the_cluster_goes_on(llama_dir: Path, tmp_path: Path) -> None:
    cluster = BackendCluster(llama_dir, tmp_path, prefills=1, decodes=2)
    cluster.start()
    long = Sampling(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    try:

        async def scenario() -> None:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=1, decodes=2)
            replies = [await client.submit(f"k{i}", _prompts(1, seed=i)[0], long) for i in range(6)]
            victims = {r.request_id for r in replies if r.decode_id == "decode-0"}
            assert victims and len(victims) < 6
            while not all(len(client.events[r.request_id]) >= 5 for r in replies):
                await asyncio.sleep(0.01)
            cluster.group.kill("decode-0")
            killed_at = asyncio.get_running_loop().time()
            for rid in victims:
                _, last = await client.result(rid, timeout=10)
                assert last.finish_reason == "error" and "decode-0" in last.error
            assert asyncio.get_running_loop().time() - killed_at < 5.0
            for r in replies:
                if r.request_id not in victims:
                    tokens, last = await client.result(r.request_id, timeout=120)
                    assert last.finish_reason == "length" and len(tokens) == 1500
            await client.wait_ready(prefills=1, decodes=1)
            after = await client.submit("after", _prompts(1)[0], Sampling(max_new_tokens=8, temperature=0.0))
            assert after.accepted and after.decode_id == "decode-1"
            tokens, last = await client.result("after")
            assert len(tokens) == 8 and last.finish_reason == "length"
            await client.wait_all_free(["prefill-0", "decode-1"])
            await client.bus.close()

        asyncio.run(scenario())
    finally:
        cluster.stop()


@pytest.mark.timeout(120)
def test_a_full_decode_instance_is_a_429_and_a_prompt_that_never_fits_a_400(llama_dir: Path, tmp_path: Path) -> None:
    # 8 blocks of 16 tokens: 128 tokens of KV on the only decode instance.
    spec = ModelSpec.from_folder(llama_dir)
    per_block = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 16, spec.dtype).bytes_per_block
    cluster = BackendCluster(llama_dir, tmp_path, prefills=1, decodes=1, decode_kv_bytes=8 * per_block)
    cluster.start()
    try:

        async def scenario() -> None:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=1, decodes=1)
            never = await client.submit("never", [5] * 200, Sampling(max_new_tokens=4))
            assert (never.accepted, never.status) == (False, 400) and "holds 128" in never.error
            first = await client.submit(
                "first", [5] * 100, Sampling(max_new_tokens=28, temperature=0.0, ignore_eos=True)
            )
            assert first.accepted
            full = await client.submit("second", [6] * 60, Sampling(max_new_tokens=4))
            assert (full.accepted, full.status) == (False, 429) and "full" in full.error
            tokens, last = await client.result("first")
            assert len(tokens) == 28 and last.finish_reason == "length"
            await client.wait_all_free(["prefill-0", "decode-0"])
            again = await client.submit("again", [6] * 60, Sampling(max_new_tokens=4))
            assert again.accepted
            await client.result("again")
            await client.bus.close()

        asyncio.run(scenario())
    finally:
        cluster.stop()


@pytest.mark.timeout(180)
def test_a_decode_cache_too_small_for_the_load_delays_requests_and_fails_none(llama_dir: Path, tmp_path: Path) -> None:
    """12 requests of up to 100 tokens each against 128 tokens of decode KV: the scheduler admits
    what fits now (429 otherwise, and the client retries), running requests outgrow the cache and
    are preempted and recomputed, hand-offs that find no room are queued to recompute; every
    request still ends with exactly the greedy output of transformers, and no block is left."""
    spec = ModelSpec.from_folder(llama_dir)
    per_block = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 16, spec.dtype).bytes_per_block
    cluster = BackendCluster(llama_dir, tmp_path, prefills=1, decodes=1, decode_kv_bytes=8 * per_block)
    cluster.start()
    prompts = [p[:60] for p in _prompts(12, seed=5)]
    sampling = Sampling(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    try:

        async def scenario() -> list[list[int]]:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=1, decodes=1)
            replies = await asyncio.gather(
                *(client.submit_retrying(f"p{i}", p, sampling) for i, p in enumerate(prompts))
            )
            assert all(r.accepted for r in replies), [r.error for r in replies]
            results = [await client.result(f"p{i}", timeout=120) for i in range(len(prompts))]
            assert all(last.finish_reason == "length" for _, last in results), results
            await client.wait_all_free(["prefill-0", "decode-0"])
            await client.bus.close()
            return [tokens for tokens, _ in results]

        outputs = asyncio.run(scenario())
        decode = cluster.metrics("decode-0")
    finally:
        cluster.stop()
    assert decode["adrenaline_preemptions_total"] + decode["adrenaline_decode_handoffs_recomputed_total"] > 0
    assert outputs == _hf_greedy(llama_dir, prompts, 40)


@pytest.mark.timeout(180)
def test_a_killed_prefill_instance_fails_only_what_it_still_held(tmp_path: Path) -> None:
    """Requests queued on a prefill instance that dies end with an error naming it within a few
    seconds; those it had already handed to decode, and those on the other prefill instance,
    finish; no KV is left anywhere. The default model, so that prefill takes long enough for a
    queue to form."""
    model = make_tiny(tmp_path / "default", "llama", preset="default")
    cluster = BackendCluster(model, tmp_path / "logs", prefills=2, decodes=1)
    cluster.start()
    sampling = Sampling(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [torch.randint(3, 1000, (1500,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(16)]
    try:

        async def scenario() -> None:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=2, decodes=1)
            replies = await asyncio.gather(
                *(client.submit_retrying(f"q{i}", p, sampling) for i, p in enumerate(prompts))
            )
            assert all(r.accepted for r in replies), [r.error for r in replies]
            on_victim = [r.request_id for r in replies if r.prefill_id == "prefill-0"]
            assert 2 <= len(on_victim) < len(replies)
            while not client.events[on_victim[0]]:  # it is prefilling its queue
                await asyncio.sleep(0.005)
            cluster.group.kill("prefill-0")
            killed_at = asyncio.get_running_loop().time()
            failed = []
            for r in replies:
                tokens, last = await client.result(r.request_id, timeout=60)
                if last.finish_reason == "error":
                    # named by the scheduler, or by the decode instance if the KV was in flight
                    assert r.request_id in on_victim, last
                    assert "prefill-0" in last.error or "KV transfer failed" in last.error, last
                    failed.append(r.request_id)
                else:
                    assert last.finish_reason == "length" and len(tokens) == 4
            assert failed, "the victim held requests it had not handed off yet"
            assert asyncio.get_running_loop().time() - killed_at < 10.0
            await client.wait_all_free(["prefill-1", "decode-0"])
            await client.bus.close()

        asyncio.run(scenario())
    finally:
        cluster.stop()


@pytest.mark.timeout(120)
def test_adrenaline_status_reads_the_cluster(cluster: BackendCluster) -> None:
    """The CLI an operator runs: every instance with its pool, from the cluster's own heartbeats."""

    async def ready() -> None:
        client = await Client.connect(cluster.nats.url)
        await client.wait_ready(prefills=2, decodes=2)
        await client.bus.close()

    asyncio.run(ready())
    cmd = [sys.executable, "-m", "services.cli", "status", "--nats-url", cluster.nats.url, "--prefix", PREFIX]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "prefill 2, decode 2, executor 0 live" in lines[0], done.stdout
    rows = {line.split()[1]: line.split() for line in lines[2:]}
    assert set(rows) == {"prefill-0", "prefill-1", "decode-0", "decode-1"}, done.stdout
    for instance, row in rows.items():
        assert row[0] == instance.split("-")[0]  # its role
        used, total = map(int, row[2].split("/"))
        assert total > 0 and 0 <= used <= total

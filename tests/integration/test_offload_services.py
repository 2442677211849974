"""Offloading through the services: prefill -> attention executor KV hand-off, and per-layer q/k/v
round trips between decode and executor processes over UCX, at fixed offload ratios and under the
auto policy."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.messages import ReleaseKV, Sampling, SubmitReply
from common.model.spec import ModelSpec
from tests.integration.cluster import BackendCluster, Client


def _prompts(n: int, seed: int = 8, lengths: tuple[int, int] = (2, 50)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(*lengths, (n,), generator=gen).tolist()
    return [torch.randint(3, 384, (size,), generator=gen).tolist() for size in sizes]


def _hf_greedy(
    folder: Path, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool = False
) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(folder)
    eos = {"eos_token_id": None} if ignore_eos else {}
    return [
        hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, **eos)[0, len(p) :].tolist()
        for p in prompts
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("ratio", "prefills"), [(1.0, 1), (0.5, 2), (1.0, 2)])
def test_offloaded_greedy_equals_transformers(llama_dir: Path, tmp_path: Path, ratio: float, prefills: int) -> None:
    _offloaded_equals_transformers(llama_dir, tmp_path, ratio, prefills)


@pytest.mark.timeout(240)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_offloaded_greedy_equals_transformers_on_cuda(llama_dir: Path, tmp_path: Path) -> None:
    """Every buffer of the offload path on the GPU: KV received into device memory on the decode
    instance and the executor, q/k/v and attention outputs moved by UCX between devices."""
    _offloaded_equals_transformers(llama_dir, tmp_path, 0.5, 1, {"ADRENALINE_DEVICE": "cuda"})


def _offloaded_equals_transformers(
    llama_dir: Path, tmp_path: Path, ratio: float, prefills: int, env: dict[str, str] | None = None
) -> None:
    cluster = BackendCluster(
        llama_dir, tmp_path, prefills=prefills, decodes=2, executors=True, offload_ratio=ratio, extra_env=env or {}
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
    finally:
        cluster.stop()
    assert offloaded == round(len(prompts) * ratio)
    assert outputs == _hf_greedy(llama_dir, prompts, 24)


@pytest.mark.timeout(240)
def test_an_executor_short_of_blocks_hands_requests_back_and_loses_nothing(llama_dir: Path, tmp_path: Path) -> None:
    """Every request offloaded to an executor whose pool holds their prompts but not their growth:
    it grows them a block at a time, evicts the newest when a step finds no block, the decode
    instance hands each back to the scheduler with its output so far, a prefill instance
    recomputes its KV and it is placed again; every output is still transformers'."""
    layout = ModelSpec.from_folder(llama_dir)
    block_bytes = 16 * layout.num_layers * 2 * layout.num_kv_heads * layout.head_dim * layout.dtype.itemsize
    cluster = BackendCluster(llama_dir, tmp_path, executors=True, offload_ratio=1.0, executor_kv_bytes=24 * block_bytes)
    cluster.start()
    prompts = _prompts(10, seed=11, lengths=(2, 14))  # one block each; 48 tokens more need three more
    sampling = Sampling(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    try:

        async def scenario() -> tuple[list[list[int]], int]:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=1, decodes=1, executors=1)
            replies = await asyncio.gather(
                *(client.submit_retrying(f"e{i}", p, sampling) for i, p in enumerate(prompts))
            )
            assert all(r.accepted for r in replies), [r.error for r in replies]
            results = [await client.result(f"e{i}") for i in range(len(prompts))]
            assert all(last.finish_reason == "length" for _, last in results), results
            await client.wait_all_free(["prefill-0", "decode-0", "executor-0"])
            await client.bus.close()
            return [tokens for tokens, _ in results], sum(r.offloaded for r in replies)

        outputs, offloaded = asyncio.run(scenario())
        evictions = cluster.metrics("executor-0").get("adrenaline_executor_evictions_total", 0.0)
        resumed = cluster.metrics("decode-0").get("adrenaline_decode_resumed_total", 0.0)
    finally:
        cluster.stop()
    assert offloaded >= 6 and evictions > 0 and resumed == evictions, (offloaded, evictions, resumed)
    assert outputs == _hf_greedy(llama_dir, prompts, 48, ignore_eos=True)


# The auto policy's test, in tokens of a 384-token decode pool (24 blocks of 16): a resident fits
# it (374 tokens at most) and holds 320 from its routing on; a wave request needs 66 to 91 to be
# admitted locally (more than the 64 left) and may grow to 89 to 114 (0.3 of the pool at most).
RESIDENT_PROMPT, RESIDENT_NEW = 310, 64
WAVE_LENGTHS, WAVE_NEW = (65, 91), 24  # prompt lengths drawn from [65, 91)
ATTEMPTS = 5  # at setting the scene (both residents decoding, each on its own paused decode instance)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("prefills", [1, 2])
def test_auto_offloads_under_memory_pressure(llama_dir: Path, tmp_path: Path, prefills: int) -> None:
    """The auto policy keeps some requests local and offloads others, decided by the scheduler's
    books rather than by how fast the cluster runs.

    Each decode instance's KV is capped at 384 tokens. First one resident request per decode
    instance (310 prompt tokens, 64 new ones, EOS ignored): the pool is empty and holds it, so it
    is kept local (by C1 or C2: nothing local to hide behind), and the second goes to the decode
    instance the first left empty. From its routing until its end, a resident leaves at most 64
    tokens free (320 in whole blocks), fewer than any wave request's prompt (65 to 90 tokens) or
    maximum length (89 to 114): the wave is under memory pressure. So its first request is
    offloaded as the probe that measures the executor wait (C1 holds: OB is about 0.5 with one
    executor and 1.0 with two, and 114 tokens need 0.3 of 384), and the later ones are offloaded
    while C1 allows and the measured wait leaves a higher output rate, and wait at the scheduler
    otherwise (held: `Scheduler.held`), until the residents end and they run locally. The
    residents are still running when the wave's first request is decided: each of these three is
    sent as soon as the one before is routed, while a resident needs its prefill, a KV transfer
    and 64 decode steps to end. That the residents are
    still running then is made certain rather than raced: each resident's decode instance is
    paused (SIGSTOP) from the moment the resident has decoded a token until the first wave
    request is routed (on a loaded machine a resident once finished first), with `dead_after_s`
    raised so the pause cannot read as a death; if a resident still ends before its pause lands,
    or the second is routed to the instance the first paused (by a view older than the end of a
    resident sent before), the residents are sent again. (Short requests on a near-empty pool were offloaded only as
    C2 probes, which need enough local requests still running: when routing was slower than
    decoding, all were refused.)
    """
    cluster = BackendCluster(
        llama_dir,
        tmp_path,
        prefills=prefills,
        decodes=2,
        executors=True,
        offload_ratio="auto",
        decode_kv_bytes=384 * 512,  # 512 bytes per token of KV for this model
        extra_env={"ADRENALINE_DEAD_AFTER_S": "30"},
    )
    cluster.start()
    residents = _prompts(2, seed=3, lengths=(RESIDENT_PROMPT, RESIDENT_PROMPT + 1))
    wave = _prompts(12, seed=8, lengths=WAVE_LENGTHS)
    resident_sampling = Sampling(max_new_tokens=RESIDENT_NEW, temperature=0.0, ignore_eos=True)
    wave_sampling = Sampling(max_new_tokens=WAVE_NEW, temperature=0.0)
    instances = [f"prefill-{i}" for i in range(prefills)] + ["decode-0", "decode-1"]
    instances += [f"executor-{i}" for i in range(prefills)]
    try:

        async def residents_then_first(client: Client, attempt: int) -> tuple[list[str], SubmitReply] | None:
            """Both residents decoding, each one's decode instance paused from its first decoded token
            until the first wave request is routed; the resident ids and that request's reply. None
            when a resident ended before its pause landed (a loaded machine can delay the client that
            long), or both went to one instance: the scene was not set, so the caller sets it again
            rather than judge the policy."""
            ids = [f"r{attempt}-{i}" for i in range(len(residents))]
            paused = []
            try:
                for rid, prompt in zip(ids, residents, strict=True):
                    reply = await client.submit_retrying(rid, prompt, resident_sampling)
                    assert reply.accepted and not reply.offloaded, reply
                    if reply.decode_id in [c.name for c in cluster.group.children if c.process.pid in paused]:
                        # routed by a view of the other instance older than its last resident's end
                        # (the scheduler hears heartbeats and ends on separate subscriptions)
                        return None
                    while len(client.events[rid]) < 2:  # its first decoded token: the KV is there
                        await asyncio.sleep(0.002)
                    child = next(c for c in cluster.group.children if c.name == reply.decode_id)
                    os.kill(child.process.pid, signal.SIGSTOP)
                    paused.append(child.process.pid)
                await client.bus.flush()  # whatever the paused instances sent has reached us
                if any(client.done[rid].is_set() for rid in ids):
                    return None
                return ids, await client.submit("w0", wave[0], wave_sampling)  # decided at once, never a 429
            finally:
                for pid in paused:
                    os.kill(pid, signal.SIGCONT)

        async def scenario() -> tuple[list[list[int]], list[list[int]], int]:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=prefills, decodes=2, executors=prefills)
            for attempt in range(ATTEMPTS):
                scene = await residents_then_first(client, attempt)
                if scene is not None:
                    break
                for i in range(len(residents)):  # let this attempt's residents end, then set the scene again
                    await client.result(f"r{attempt}-{i}")
                await client.wait_all_free(instances)
                await client.wait_scheduler_idle()
            assert scene is not None, f"the scene was not set in {ATTEMPTS} attempts"
            resident_ids, first = scene
            assert first.accepted and first.offloaded, first
            replies = [first] + await asyncio.gather(
                *(client.submit_retrying(f"w{i}", p, wave_sampling) for i, p in enumerate(wave) if i > 0)
            )
            assert all(r.accepted for r in replies), [r.error for r in replies]
            held_out = [await client.result(rid) for rid in resident_ids]
            assert all(last.finish_reason == "length" for _, last in held_out), held_out
            results = [await client.result(f"w{i}") for i in range(len(wave))]
            assert all(last.finish_reason in ("length", "stop") for _, last in results), results
            await client.wait_all_free(instances)
            await client.bus.close()
            return [t for t, _ in held_out], [t for t, _ in results], sum(r.offloaded for r in replies)

        resident_outputs, outputs, offloaded = asyncio.run(scenario())
        decisions = {
            k: v
            for k, v in cluster.metrics("scheduler").items()
            if "offload_decisions_total{" in k or "offload_bound{" in k
        }
    finally:
        cluster.stop()
    # one decision per request, the one that routed it: a held request's reply (accepted before it
    # was routed) does not say where it went, so replies show at most the offloaded ones
    decided = sum(v for k, v in decisions.items() if 'offloaded="true"' in k)
    assert offloaded <= decided and 0 < decided < len(wave) + len(residents), decisions
    # under memory pressure, before a wait is measured and after, requests go as their output rate says
    pressure = 'adrenaline_scheduler_offload_decisions_total{offloaded="true",reason="memory_pressure_unmeasured"}'
    assert decisions.get(pressure, 0) >= 1, decisions
    assert resident_outputs == _hf_greedy(llama_dir, residents, RESIDENT_NEW, ignore_eos=True)
    assert outputs == _hf_greedy(llama_dir, wave, WAVE_NEW)


@pytest.mark.timeout(180)
def test_a_killed_executor_fails_only_its_requests(llama_dir: Path, tmp_path: Path) -> None:
    # a transfer timeout far beyond the 1 s heartbeat bound: an end that comes before it was the watch's
    timeout = {"ADRENALINE_TRANSFER_TIMEOUT_S": "60"}
    cluster = BackendCluster(
        llama_dir, tmp_path, prefills=1, decodes=1, executors=True, offload_ratio=0.5, extra_env=timeout
    )
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
            # its step waits on, long before the 60 s transfer timeout would end it.
            while not all(len(client.events[rid]) >= seen[rid] + 2 for rid in survivors):
                await asyncio.sleep(0.01)
            assert time.monotonic() - killed < 30
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


@pytest.mark.timeout(240)
def test_a_release_overtaking_a_step_fails_nothing_else(llama_dir: Path, tmp_path: Path) -> None:
    """The executor forgets one running request (as when an abort reaches it before the decode
    instance's next step names it): that step is answered at once and every other request on the
    executor goes on, greedy-exact, instead of the decode instance waiting out its transfer
    timeout and failing them all."""
    cluster = BackendCluster(llama_dir, tmp_path, executors=True, offload_ratio=1.0)
    cluster.start()
    prompts = _prompts(4, seed=11)
    sampling = Sampling(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    try:

        async def scenario() -> list[list[int]]:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=1, decodes=1, executors=1)
            replies = [await client.submit(f"k{i}", p, sampling) for i, p in enumerate(prompts)]
            assert all(r.accepted and r.offloaded for r in replies), replies
            while not all(len(client.events[f"k{i}"]) >= 3 for i in range(len(prompts))):
                await asyncio.sleep(0.01)
            release = client.subjects.instance("executor-0", "release")
            await client.bus.publish(release, ReleaseKV("k0"))  # to the executor alone
            results = [await client.result(f"k{i}", timeout=60) for i in range(1, len(prompts))]
            # before: the step naming k0 went unanswered, and after the transfer timeout every
            # request on the executor ended with "error"
            assert all(last.finish_reason == "length" for _, last in results), results
            await client.result("k0", timeout=60)  # runs to its end on the decode instance, KV-less
            await client.wait_all_free(["prefill-0", "decode-0", "executor-0"])
            await client.bus.close()
            return [tokens for tokens, _ in results]

        outputs = asyncio.run(scenario())
    finally:
        cluster.stop()
    assert outputs == _hf_greedy(llama_dir, prompts[1:], 40, ignore_eos=True)

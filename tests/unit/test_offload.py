"""Decode attention split between the engine's own pool and attention executors (in process).

The executor service wraps the same `ExecutorCore`, and its UCX client implements the same
`ExecutorClient` calls, so these tests pin down the arithmetic of offloading: whatever share of
requests is offloaded, to however many executors, greedy output stays that of transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.config import EngineConfig
from common.engine import Engine
from common.errors import NoFreeBlocksError
from common.offload import ExecutorCore, InProcessExecutor
from common.sampling import SamplingParams
from kernels.backend import get_backend


def _prompts(vocab: int, lengths: list[int], seed: int = 4) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _executor(engine: Engine, num_blocks: int) -> ExecutorCore:
    return ExecutorCore(engine.layout, num_blocks, get_backend("torch"), engine.model.scale, engine.device)


@pytest.mark.parametrize(("ratio", "num_executors"), [(0.0, 1), (0.5, 1), (1.0, 1), (0.5, 2), (1.0, 2)])
def test_greedy_output_is_unchanged_by_offloading(llama_dir: Path, ratio: float, num_executors: int) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    cores = [_executor(engine, 256) for _ in range(num_executors)]
    for i, core in enumerate(cores):
        engine.executors[f"exec-{i}"] = InProcessExecutor(core)
    prompts = _prompts(engine.spec.vocab_size, [3, 17, 8, 30, 1, 22, 12, 5])
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    requests, offloaded = [], 0
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:  # one request joins per step, while the others decode
            i, prompt = pending.pop(0)
            requests.append(engine.add_request(f"r{i}", prompt, params))
        engine.step()
        for request in requests:
            new = request.executor is None and request.status.value == "running" and len(request.output_token_ids) == 1
            index = int(request.request_id[1:])
            if new and int((index + 1) * ratio) > int(index * ratio):
                engine.offload(request.request_id, f"exec-{offloaded % num_executors}")
                offloaded += 1
    assert offloaded == round(len(prompts) * ratio)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    for request, prompt in zip(requests, prompts, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
        assert request.output_token_ids == ref, request.request_id
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    for core in cores:
        core.blocks.check_integrity()
        assert core.blocks.num_free_blocks == core.blocks.num_blocks and not core.max_tokens


def test_an_executor_grows_requests_block_by_block_behind_a_watermark(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    core = _executor(engine, 4)  # 32 tokens
    kv = torch.zeros(engine.layout.num_layers, 2, 10, engine.layout.num_kv_heads, engine.layout.head_dim)
    core.admit("a", kv, max_tokens=40)  # its prompt's 2 blocks, not the 5 it may grow to
    assert core.blocks.num_used_blocks == 2 and core.reserved_blocks == 1
    with pytest.raises(NoFreeBlocksError):
        core.admit("b", kv, max_tokens=10)  # 2 blocks + a spare for each of a and b: 4 > 2 free
    assert "b" not in core.blocks and core.blocks.num_used_blocks == 2
    meta, refused = core.begin_step(["a"], [17])  # its 17th token: a third block now
    assert meta is not None and refused == [] and core.blocks.num_used_blocks == 3
    core.release("a")
    core.admit("b", kv, max_tokens=10)
    core.release("b")
    core.blocks.check_integrity()
    assert core.blocks.num_free_blocks == 4


def test_a_full_executor_hands_the_newest_requests_back(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    core = _core_with(engine, {"old": 8, "new": 8}, num_blocks=4)  # 2 blocks used, 2 spare
    meta, refused = core.begin_step(["old", "new"], [9, 9])  # each takes its spare
    assert refused == [] and core.blocks.num_free_blocks == 0
    meta, refused = core.begin_step(["old", "new"], [17, 17])  # both need a block, none is free
    assert refused == [1] and meta is not None and meta.context_lens.tolist() == [17]
    assert not core.holds("new") and "new" not in core.blocks and core.evictions == 1
    assert core.blocks.num_tokens("old") == 17
    core.release("old")
    core.blocks.check_integrity()
    assert core.blocks.num_free_blocks == 4


def test_requests_handed_back_by_a_full_executor_lose_nothing(llama_dir: Path) -> None:
    """Every request offloaded to an executor far too small for their growth: the executor
    evicts, the engine recomputes them locally, and greedy output is still transformers'."""
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    core = _executor(engine, 14)  # 112 tokens, for 6 requests growing to 60 tokens each
    engine.executors["exec"] = InProcessExecutor(core)
    prompts = _prompts(engine.spec.vocab_size, [3, 17, 8, 12, 5, 9])
    params = SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    requests = [engine.add_request(f"r{i}", prompt, params) for i, prompt in enumerate(prompts)]
    offloaded, taken_back = 0, []
    while engine.has_unfinished():
        engine.step()
        taken_back += engine.taken_back  # what the decode service tells the scheduler: local now
        assert all(engine.requests[r].executor is None for r in engine.taken_back)
        for request in requests:
            fresh = request.executor is None and request.status.value == "running" and request.num_tokens < 24
            if fresh and core.can_admit(request.num_tokens - 1):
                engine.offload(request.request_id, "exec")
                offloaded += 1
    assert offloaded >= 4 and core.evictions > 0, (offloaded, core.evictions)
    assert engine.num_handed_back == core.evictions == len(taken_back)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    for request, prompt in zip(requests, prompts, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt) :].tolist()
        assert request.output_token_ids == ref, request.request_id
    core.blocks.check_integrity()
    assert core.blocks.num_free_blocks == core.blocks.num_blocks and not core.max_tokens
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_aborting_an_offloaded_request_frees_its_executor_kv(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    core = _executor(engine, 64)
    engine.executors["exec"] = InProcessExecutor(core)
    engine.add_request("x", [5, 6, 7, 8], SamplingParams(max_new_tokens=30, temperature=0.0))
    engine.step()
    engine.offload("x", "exec")
    engine.step()
    assert core.blocks.num_used_blocks == 1 and engine.blocks.num_used_blocks == 0
    assert engine.abort("x")
    assert core.blocks.num_used_blocks == 0
    engine.check_integrity()


def _core_with(engine: Engine, requests: dict[str, int], num_blocks: int = 16) -> ExecutorCore:
    """An executor core holding `requests` (id -> prompt tokens), each allowed to grow to 40 tokens."""
    core = _executor(engine, num_blocks)
    for request_id, tokens in requests.items():
        kv = torch.zeros(engine.spec.num_layers, 2, tokens, engine.spec.num_kv_heads, engine.spec.head_dim)
        core.admit(request_id, kv, max_tokens=40)
    return core


def test_a_release_during_a_step_waits_for_the_step_to_end(llama_dir: Path) -> None:
    """An abort overtaking a step must not free blocks that the step's later layers still write."""
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    core = _core_with(engine, {"a": 7, "b": 7})
    with core.stepping(["a", "b"]):
        core.begin_step(["a", "b"], [8, 8])
        core.release("a")
        assert not core.holds("a") and core.blocks.num_tokens("a") == 8  # blocks kept for the layers to come
        core.release("a")  # twice, as an abort and a release both arrive: still once
    with pytest.raises(KeyError):
        core.blocks.num_tokens("a")
    assert core.holds("b") and "a" not in core.max_tokens
    core.release("b")
    core.blocks.check_integrity()
    assert core.blocks.num_free_blocks == core.blocks.num_blocks


def test_a_step_beyond_a_requests_reservation_changes_nothing(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    core = _core_with(engine, {"a": 7, "b": 7})
    free = core.blocks.num_free_blocks
    with pytest.raises(ValueError, match="may grow to 40"):
        core.begin_step(["a", "b"], [8, 41])  # b past its reservation: neither is appended
    assert core.blocks.num_free_blocks == free and core.blocks.num_tokens("a") == 7
    with pytest.raises(KeyError):
        core.begin_step(["a", "stranger"], [8, 8])
    assert core.blocks.num_tokens("a") == 7


def test_an_executors_heartbeat_counts_hand_offs_in_flight_once(llama_dir: Path) -> None:
    """The scheduler counts a routed request until the executor shows it admitted; the executor's
    heartbeat must not take the same blocks off its free count too."""
    import asyncio

    from common.tensor_channel import TensorChannel
    from services.attention_executor.service import ExecutorService
    from services.runtime import InstanceSettings

    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    core = _core_with(engine, {"held": 8}, num_blocks=16)

    async def heartbeat_free() -> int:
        channel = await TensorChannel.create()  # a real UCX worker: the heartbeat carries its address
        try:
            service = ExecutorService(
                InstanceSettings(model=str(llama_dir), instance_id="executor-0"), engine.spec, core, None, channel
            )  # type: ignore[arg-type]
            service.pending["in-flight"] = 3  # blocks promised to a hand-off whose KV is on its way
            return service.load().free_blocks
        finally:
            await channel.close()

    assert asyncio.run(heartbeat_free()) == 16 - 1 - 1  # used by "held", and its growth watermark

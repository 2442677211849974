"""The engine end to end: greedy fidelity against `transformers.generate`, no leaks, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.config import EngineConfig
from common.engine import Engine
from common.errors import InvalidRequestError
from common.kv_pool import KVLayout
from common.model.spec import ModelSpec
from common.model.tiny import ARCHS
from common.request import FinishReason, Request
from common.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=64, temperature=0.0)
LENGTHS = [1, 3, 9, 16, 17, 31, 48, 70, 5, 12]


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """One prompt at a time, so the reference has no padding: the plainest `generate` there is."""
    hf = AutoModelForCausalLM.from_pretrained(folder)
    out = []
    for prompt in prompts:
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
        out.append(ids[0, len(prompt) :].tolist())
    return out


def _bytes_per_block(folder: Path, block_size: int) -> int:
    spec = ModelSpec.from_folder(folder)
    return KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, spec.dtype).bytes_per_block


def _run_with_joins(
    engine: Engine, prompts: list[list[int]], params: SamplingParams, first: int, join_every: int
) -> list[Request]:
    """Start with `first` requests, then add one every `join_every` steps, while others run."""
    requests = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts[:first])]
    pending = list(enumerate(prompts))[first:]
    steps = 0
    while engine.has_unfinished() or pending:
        engine.step()
        steps += 1
        if pending and steps % join_every == 0:
            i, prompt = pending.pop(0)
            requests.append(engine.add_request(f"r{i}", prompt, params))
    return requests


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_with_requests_joining_mid_run(tiny_models: dict[str, Path], arch: str) -> None:
    folder = tiny_models[arch]
    engine = Engine.from_folder(folder, EngineConfig(block_size=16, kv_cache_bytes=4 * 2**20))
    prompts = _prompts(engine.spec.vocab_size, LENGTHS)
    requests = _run_with_joins(engine, prompts, GREEDY, first=4, join_every=7)
    expected = _hf_greedy(folder, prompts, GREEDY.max_new_tokens)
    for request, ref in zip(requests, expected, strict=True):
        assert request.output_token_ids == ref, request.request_id
    # the comparison must cover full-length outputs, not only early stops
    assert sum(len(r.output_token_ids) == 64 for r in requests) >= 8
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_greedy_survives_preemption_under_a_tight_kv_budget(llama_dir: Path) -> None:
    per_block = _bytes_per_block(llama_dir, block_size=4)
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=4, kv_cache_bytes=60 * per_block))
    assert engine.capacity_tokens == 240  # while 8 requests want up to 90 tokens each
    prompts = _prompts(engine.spec.vocab_size, [20, 25, 30, 5, 8, 13, 2, 40])
    params = SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    requests = _run_with_joins(engine, prompts, params, first=8, join_every=1)
    assert engine.num_preemptions > 0, "the budget was meant to force preemption"
    expected = _hf_greedy(llama_dir, prompts, 48)
    for request, ref in zip(requests, expected, strict=True):
        assert request.output_token_ids[: len(ref)] == ref
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_request_queued_with_its_first_token_recomputes_the_same_output(llama_dir: Path) -> None:
    """What a decode instance does with a hand-off it has no room for: the prompt and the first
    token (sampled by prefill) are recomputed here, behind the requests already queued."""
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=4, kv_cache_bytes=2**20))
    prompts = _prompts(engine.spec.vocab_size, [7, 19, 30])
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    expected = _hf_greedy(llama_dir, prompts, 20)
    engine.add_request("r0", prompts[0], params)
    engine.step()
    engine.add_waiting("r1", prompts[1], expected[1][0], params)
    engine.add_waiting("r2", prompts[2], expected[2][0], params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_waiting("r2", prompts[2], expected[2][0], params)
    queued = [engine.requests[f"r{i}"] for i in range(3)]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in queued] == expected
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_step_that_preempts_every_running_request_returns_nothing(llama_dir: Path) -> None:
    """On a decode instance, blocks also belong to KV still arriving (allocated before the transfer):
    a lone running request that cannot grow is preempted, and the step has no batch left. It ends
    with no output instead of running a model on an empty batch (which killed the decode instance),
    and the request recomputes once blocks are free."""
    per_block = _bytes_per_block(llama_dir, block_size=4)
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=4, kv_cache_bytes=6 * per_block))
    prompt = _prompts(engine.spec.vocab_size, [7])[0]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    request = engine.add_request("r0", prompt, params)
    engine.step()  # the prefill: 7 tokens of KV in 2 blocks
    engine.blocks.allocate("arriving", 4 * 4)  # a hand-off's KV on its way in takes the rest
    assert engine.blocks.num_free_blocks == 0
    outputs = [engine.step() for _ in range(2)]  # token 8 fits its second block; token 9 needs a third
    assert len(outputs[0]) == 1 and outputs[1] == []
    assert engine.num_preemptions == 1 and not engine.running and list(engine.waiting) == [request]
    engine.blocks.free("arriving")  # its transfer failed
    while engine.has_unfinished():
        engine.step()
    assert request.output_token_ids == _hf_greedy(llama_dir, [prompt], 12)[0]
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton needs TRITON_INTERPRET=1 on CPU")
def test_triton_backend_engine_matches_transformers(llama_dir: Path) -> None:
    engine = Engine.from_folder(
        llama_dir, EngineConfig(block_size=16, attention_backend="triton", kv_cache_bytes=2**20)
    )
    prompts = _prompts(engine.spec.vocab_size, [3, 18, 33])
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    requests = engine.generate(prompts, params)
    assert [r.output_token_ids for r in requests] == _hf_greedy(llama_dir, prompts, 12)


def test_abort_frees_blocks_of_waiting_and_running_requests(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=4, max_num_seqs=2, kv_cache_bytes=2**20))
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    for i, prompt in enumerate(_prompts(engine.spec.vocab_size, [10, 11, 12])):
        engine.add_request(f"a{i}", prompt, params)
    engine.step()  # a0 and a1 prefilled, a2 waits (max_num_seqs=2)
    assert engine.blocks.num_used_blocks > 0
    assert engine.abort("a2") and engine.abort("a0")
    assert not engine.abort("a0") and not engine.abort("nope")
    engine.check_integrity()
    assert engine.blocks.owners() == ["a1"]
    while engine.has_unfinished():
        engine.step()
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_stop_tokens_and_length_limits(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir)
    prompt = _prompts(engine.spec.vocab_size, [10])[0]
    [free_run] = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    assert free_run.finish_reason is FinishReason.LENGTH and len(free_run.output_token_ids) == 20
    stop_at = free_run.output_token_ids[5]
    first = free_run.output_token_ids.index(stop_at)
    [stopped] = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=(stop_at,)))
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.output_token_ids == free_run.output_token_ids[: first + 1]


def test_logprobs_are_those_of_the_chosen_tokens(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir)
    prompt = _prompts(engine.spec.vocab_size, [6])[0]
    [req] = engine.generate([prompt], SamplingParams(max_new_tokens=3, temperature=0.0, logprobs=2))
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + req.output_token_ids])).logits[0]
    ref = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    for i, token in enumerate(req.output_token_ids):
        assert req.output_logprobs[i] == pytest.approx(ref[i, token].item(), abs=1e-4)
        top_ids = [t for t, _ in req.top_logprobs[i]]
        assert top_ids == ref[i].topk(2).indices.tolist()
        assert top_ids[0] == token  # greedy picks the most likely


def test_bad_requests_are_refused_naming_the_field(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=16, kv_cache_bytes=2**20))
    vocab, context = engine.spec.vocab_size, engine.spec.max_model_len
    ok = SamplingParams(max_new_tokens=4)
    cases = [
        ([], ok, "prompt", "empty"),
        ([5, vocab], ok, "prompt", "outside the vocabulary"),
        ([5, -1], ok, "prompt", "outside the vocabulary"),
        ([5] * context, ok, "prompt", "context"),
        ([5] * (context - 2), SamplingParams(max_new_tokens=3), "max_new_tokens", "exceed the context"),
    ]
    for prompt, params, field, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as err:
            engine.add_request("x", prompt, params)
        assert err.value.field == field
    engine.add_request("dup", [5], ok)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("dup", [5], ok)
    assert err.value.field == "request_id"
    small = Engine.from_folder(
        llama_dir, EngineConfig(block_size=4, kv_cache_bytes=4 * _bytes_per_block(llama_dir, block_size=4))
    )
    assert small.capacity_tokens == 16
    with pytest.raises(InvalidRequestError, match="capacity") as err:
        small.add_request("big", [5] * 10, SamplingParams(max_new_tokens=10))
    assert err.value.field == "max_new_tokens"
    assert small.blocks.num_free_blocks == small.blocks.num_blocks


def test_kv_budget_below_one_block_is_a_config_error(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine.from_folder(llama_dir, EngineConfig(kv_cache_bytes=1))
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)

"""Logits processors through the engine, against transformers' `generate` with its own processors.

Greedy runs must equal `generate` token for token, with requests that use no processor batched
beside them. Seeded runs are held to a reference loop of transformers' model and processors that
draws with the engine's noise for `(seed, step)` (transformers' `multinomial` cannot be matched
draw for draw), and to the same tokens when the first token is sampled by one engine and the
rest by another, as prefill and decode instances do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from common.config import EngineConfig
from common.engine import Engine
from common.errors import InvalidRequestError
from common.sampling import SamplingParams, _step_generator

LENGTHS = [3, 11, 24, 40]
MAX_NEW = 24


class OpenAIPenalties(LogitsProcessor):
    """Frequency and presence penalties as OpenAI defines them, over the generated tokens only."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        output = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        result: torch.FloatTensor = scores - self.frequency * counts - self.presence * (counts > 0).float()  # type: ignore[assignment]
        return result


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> Engine:
    return Engine.from_folder(llama_dir, EngineConfig(block_size=16, kv_cache_bytes=4 * 2**20))


@pytest.fixture(scope="module")
def hf(llama_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(llama_dir)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    # a small range of ids, so that prompts and outputs share tokens and penalties bite
    return [torch.randint(3, 40, (n,), generator=gen).tolist() for n in LENGTHS]


def _run_beside_plain_requests(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Every prompt with `params`, each batched with a plain greedy request on the same prompt."""
    plain = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
    requests = []
    for i, prompt in enumerate(prompts):
        requests.append(engine.add_request(f"p{i}", prompt, params))
        engine.add_request(f"plain{i}", prompt, plain)
    while engine.has_unfinished():
        engine.step()
    engine.check_integrity()
    return [r.output_token_ids for r in requests]


def _generate(hf: Any, prompt: list[int], **kwargs: Any) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
    return list(out[0, len(prompt) :].tolist())


def test_greedy_with_repetition_penalty_equals_transformers(engine: Engine, hf: Any) -> None:
    prompts = _prompts(engine.spec.vocab_size)
    for penalty in (1.3, 0.8):
        params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, repetition_penalty=penalty)
        got = _run_beside_plain_requests(engine, prompts, params)
        assert got == [_generate(hf, p, repetition_penalty=penalty) for p in prompts]
    plain = [_generate(hf, p) for p in prompts]
    assert got != plain, "the penalty must change the output for this test to mean anything"


def test_greedy_with_logit_bias_equals_transformers(engine: Engine, hf: Any) -> None:
    prompts = _prompts(engine.spec.vocab_size)
    bias = ((17, 4.0), (101, 6.5), (200, -100.0))
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, logit_bias=bias)
    got = _run_beside_plain_requests(engine, prompts, params)
    reference = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])
    assert got == [_generate(hf, p, logits_processor=LogitsProcessorList([reference])) for p in prompts]
    assert any(101 in out or 17 in out for out in got)


def test_greedy_with_frequency_and_presence_penalties_equals_openai_definition(engine: Engine, hf: Any) -> None:
    prompts = _prompts(engine.spec.vocab_size)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, frequency_penalty=0.7, presence_penalty=0.9)
    got = _run_beside_plain_requests(engine, prompts, params)
    expected = [
        _generate(hf, p, logits_processor=LogitsProcessorList([OpenAIPenalties(len(p), 0.7, 0.9)])) for p in prompts
    ]
    assert got == expected
    assert got != [_generate(hf, p) for p in prompts]


def test_min_tokens_holds_back_a_stop_token_as_transformers_does(engine: Engine, hf: Any) -> None:
    prompts = _prompts(engine.spec.vocab_size)
    eos = list(engine.spec.eos_token_ids)
    for prompt in prompts:
        free = _generate(hf, prompt)
        stop = free[1]  # without min_tokens the request ends at its second token
        params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(stop,), min_tokens=6)
        [request] = engine.generate([prompt], params)
        expected = _generate(hf, prompt, eos_token_id=[stop, *eos], min_new_tokens=6)
        expected = expected[: expected.index(stop) + 1] if stop in expected[6:] else expected
        assert request.output_token_ids == expected
        assert len(request.output_token_ids) > 6 and stop not in request.output_token_ids[:6]


def _reference_seeded(
    hf: Any, prompt: list[int], params: SamplingParams, processors: list[Any], warpers: tuple[Any, ...] = ()
) -> list[int]:
    """transformers' model, processors and `warpers` (after the temperature), drawing with the
    engine's noise for (seed, step)."""
    assert params.seed is not None
    ids = list(prompt)
    for step in range(params.max_new_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[:, -1].float()
        chain = [*processors, TemperatureLogitsWarper(params.temperature), *warpers]
        probs = torch.softmax(LogitsProcessorList(chain)(torch.LongTensor([ids]), logits)[0], dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=_step_generator(params.seed, step))
        ids.append(int((probs / noise).argmax()))
    return ids[len(prompt) :]


def test_seeded_sampling_with_processors_equals_the_reference(engine: Engine, hf: Any) -> None:
    prompts = _prompts(engine.spec.vocab_size)
    params = SamplingParams(
        max_new_tokens=MAX_NEW,
        temperature=0.8,
        seed=1234,
        ignore_eos=True,
        repetition_penalty=1.4,
        logit_bias=((50, 3.0),),
        min_tokens=4,
        stop_token_ids=(7,),
        frequency_penalty=0.3,
        presence_penalty=0.2,
    )
    got = _run_beside_plain_requests(engine, prompts, params)
    for prompt, tokens in zip(prompts, got, strict=True):
        processors = [
            SequenceBiasLogitsProcessor([[[50], 3.0]]),
            MinNewTokensLengthLogitsProcessor(len(prompt), 4, [7]),
            RepetitionPenaltyLogitsProcessor(1.4),
            OpenAIPenalties(len(prompt), 0.3, 0.2),
        ]
        expected = _reference_seeded(hf, prompt, params, processors)
        if 7 in expected[4:]:
            expected = expected[: expected.index(7, 4) + 1]
        assert tokens == expected


def test_seeded_processors_give_the_same_tokens_when_another_engine_takes_over(llama_dir: Path, engine: Engine) -> None:
    """Prefill samples the first token, a decode instance the rest: the history and the step index
    travel with the request, so the output is the one a single engine gives."""
    prompt = _prompts(engine.spec.vocab_size)[2]
    params = SamplingParams(
        max_new_tokens=MAX_NEW, temperature=1.0, seed=99, ignore_eos=True, repetition_penalty=1.5, presence_penalty=1.0
    )
    [whole] = engine.generate([prompt], params)
    prefill = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    first = prefill.add_request("r", prompt, params)
    prefill.step()
    decode = Engine.from_folder(llama_dir, EngineConfig(block_size=4, kv_cache_bytes=2**20))
    rest = decode.add_waiting("r", prompt, first.output_token_ids[0], params)
    while decode.has_unfinished():
        decode.step()
    assert rest.output_token_ids == whole.output_token_ids


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_field(engine: Engine) -> None:
    vocab = engine.spec.vocab_size
    for field, params in (
        ("stop_token_ids", SamplingParams(stop_token_ids=(vocab,))),
        ("logit_bias", SamplingParams(logit_bias=((vocab + 3, 1.0),))),
        ("bad_words", SamplingParams(bad_words=((5, vocab),))),
    ):
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("bad", [5, 6], params)
        assert err.value.field == field


def test_seeded_min_p_equals_transformers_min_p_warper(engine: Engine, hf: Any) -> None:
    """min_p after the temperature, as transformers' `MinPLogitsWarper`; it must change the draws
    (a hot temperature spreads the mass so that it has tokens to drop) for this to mean anything."""
    prompts = _prompts(engine.spec.vocab_size)[:2]
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.5, seed=77, ignore_eos=True, min_p=0.2)
    got = _run_beside_plain_requests(engine, prompts, params)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == _reference_seeded(hf, prompt, params, [], (MinPLogitsWarper(0.2),))
    unbounded = _run_beside_plain_requests(engine, prompts, dataclasses.replace(params, min_p=0.0))
    assert got != unbounded


def test_greedy_with_bad_words_equals_transformers(engine: Engine, hf: Any) -> None:
    """Words taken from the free output (so that banning them bites): one token, and two tokens,
    whose first token does not end the prompt (vLLM matches the output only, transformers the
    prompt too: they agree unless a word straddles the prompt's end)."""
    prompts = _prompts(engine.spec.vocab_size)
    for prompt in prompts:
        free = _generate(hf, prompt)
        words = [[free[2]], free[5:7]]
        assert prompt[-1] != free[5]
        params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, bad_words=tuple(map(tuple, words)))
        [got] = _run_beside_plain_requests(engine, [prompt], params)
        assert got == _generate(hf, prompt, bad_words_ids=words)
        assert got[:2] == free[:2] and got[2] != free[2]


def test_prompt_logprobs_equal_transformers_log_softmax(llama_dir: Path, engine: Engine, hf: Any) -> None:
    """Each prompt token's logprob given the tokens before it (from the second on), and the most
    likely tokens at each position, equal log_softmax of transformers' logits over the prompt; they
    come once, with the first token, and only to requests that ask (batched with one that does not).
    A decode engine that recomputes the prompt (its KV did not come) does not send them again."""
    prompts = _prompts(engine.spec.vocab_size)
    asked = [
        engine.add_request(f"lp{i}", p, SamplingParams(max_new_tokens=3, prompt_logprobs=(4, 0, 4, 1)[i]))
        for i, p in enumerate(prompts)
    ]
    engine.add_request("none", prompts[0], SamplingParams(max_new_tokens=3))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    firsts = {o.request_id: o for o in outputs if o.index == 0}
    assert firsts["none"].prompt_logprobs is None
    assert all(o.prompt_logprobs is None for o in outputs if o.index > 0)
    for request, prompt in zip(asked, prompts, strict=True):
        got = firsts[request.request_id].prompt_logprobs
        assert got is not None
        with torch.no_grad():
            expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
        targets = torch.tensor(prompt[1:])
        torch.testing.assert_close(
            torch.tensor(got.logprobs), expected.gather(1, targets[:, None])[:, 0], atol=1e-4, rtol=0
        )
        k = request.params.prompt_logprobs or 0
        assert [len(row) for row in got.top] == [k] * (len(prompt) - 1)
        if k:
            values, indices = expected.topk(k, dim=-1)
            assert [[t for t, _ in row] for row in got.top] == indices.tolist()
            torch.testing.assert_close(
                torch.tensor([[v for _, v in row] for row in got.top]), values, atol=1e-4, rtol=0
            )
    decode = Engine.from_folder(llama_dir, EngineConfig(block_size=4, kv_cache_bytes=2**20))
    params = SamplingParams(max_new_tokens=3, prompt_logprobs=2)
    decode.add_waiting("r", prompts[1], asked[1].output_token_ids[0], params)
    while decode.has_unfinished():
        assert all(o.prompt_logprobs is None for o in decode.step())

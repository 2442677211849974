"""The gateway's sampling extensions, several choices per request, echo and chat continuation.

Same harness as the other gateway tests (gateway_harness.py, a separate instance for this module): what
the official client sends (vLLM's extensions as `extra_body`) must reach the backend as the
`Sampling` the engine applies, bad values must be 400s naming the field before anything is
submitted, and `n` and batches of prompts must come back indexed as OpenAI numbers them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import httpx
import openai
import pytest

from tests.integration.gateway_harness import API_KEY, MODEL, Env, standin_prompt_logprobs, standin_tokens
from tests.integration.gateway_harness import _reset_backend as _reset_backend  # autouse: normal mode, no delay
from tests.integration.gateway_harness import env as env  # the module fixture, a fresh instance for this module

pytestmark = pytest.mark.timeout(60)
USER = [{"role": "user", "content": "x"}]


def _submits(env: Env, request_id: str) -> list[Any]:
    return sorted((s for s in env.backend.submits if s.request_id.startswith(request_id)), key=lambda s: s.request_id)


def test_vllm_and_openai_sampling_fields_reach_the_backend(env: Env) -> None:
    extra = {
        "stop_token_ids": [5, 9],
        "min_tokens": 3,
        "repetition_penalty": 1.3,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "min_p": 0.25,
        "bad_words": ["cache", "  xyz"],
    }
    response = env.client().completions.create(
        model=MODEL,
        prompt="the cache",
        max_tokens=6,
        presence_penalty=0.5,
        frequency_penalty=-1.5,
        logit_bias={"17": 3.0, "300": -100},
        extra_body=extra,
    )
    [submit] = _submits(env, response.id)
    s = submit.sampling
    assert (s.stop_token_ids, s.min_tokens, s.repetition_penalty) == ([5, 9], 3, 1.3)
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -1.5)
    assert sorted(s.logit_bias) == [(17, 3.0), (300, -100.0)]
    assert s.min_p == 0.25
    # vLLM's rule: a word's tokens without its leading spaces, and with one space where that makes
    # another first token in as many tokens ("cache" mid-text is another token; "xyz" is three bytes,
    # and " xyz" four tokens: not added)
    encode = lambda text: env.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert encode(" cache")[0] != encode("cache")[0] and len(encode(" xyz")) != len(encode("xyz"))
    assert s.bad_words == [encode("cache"), encode(" cache"), encode("xyz")]
    assert s.prompt_logprobs is None  # not asked: the prefill instance computes none
    chat = env.client().chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, presence_penalty=2, extra_body={"repetition_penalty": 0.5}
    )
    [submit] = _submits(env, chat.id)
    assert (submit.sampling.presence_penalty, submit.sampling.repetition_penalty) == (2.0, 0.5)


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("chat/completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("completions", {"repetition_penalty": -1}, "repetition_penalty"),
        ("completions", {"logit_bias": {"x": 1}}, "logit_bias"),
        ("completions", {"logit_bias": {"-3": 1}}, "logit_bias"),
        ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
        ("completions", {"logit_bias": {"1" * 5000: 1}}, "logit_bias"),
        ("chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ("completions", {"min_tokens": -1}, "min_tokens"),
        ("completions", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ("completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
        ("chat/completions", {"stop_token_ids": [99999999]}, "stop_token_ids"),
        ("completions", {"stop_token_ids": list(range(257))}, "stop_token_ids"),
        ("completions", {"n": 0}, "n"),
        ("completions", {"n": 65, "prompt": ["a", "b"]}, "n"),
        ("completions", {"prompt": ["a"] * 129}, "prompt"),
        ("completions", {"min_p": 1.5}, "min_p"),
        ("chat/completions", {"min_p": -0.1}, "min_p"),
        ("completions", {"bad_words": [" \t "]}, "bad_words[0]"),
        ("completions", {"bad_words": ["x"] * 65}, "bad_words"),
        ("chat/completions", {"bad_words": ["x", "x" * 101]}, "bad_words[1]"),
        ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
        ("completions", {"best_of": 2}, "best_of"),  # best_of > n: ranking samples is not implemented
        ("completions", {"best_of": 2, "n": 3}, "best_of"),
        ("completions", {"suffix": "after"}, "suffix"),
        ("chat/completions", {"continue_final_message": True}, "continue_final_message"),
        (
            "chat/completions",
            {"continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
        ),  # the last message is the user's
    ],
)
def test_bad_values_are_400_naming_the_field_before_the_backend(
    env: Env, path: str, fields: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = {"prompt": "x"} if path == "completions" else {"messages": USER}
    submits = len(env.backend.submits)
    client = env.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.post(f"/{path}", body={"model": MODEL, **base, **fields}, cast_to=object)
    error = bad.value.response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert len(env.backend.submits) == submits, "a refused request reached the backend"


def test_n_choices_are_indexed_seeded_apart_and_summed(env: Env) -> None:
    response = env.client().completions.create(model=MODEL, prompt="seeded", max_tokens=5, n=3, seed=41)
    ids = env.tokenizer("seeded").input_ids
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.text == env.expected(ids, 5) for c in response.choices)  # the stand-in ignores seeds
    submits = _submits(env, response.id)
    assert [s.request_id for s in submits] == [f"{response.id}-{j}" for j in range(3)]
    assert [s.sampling.seed for s in submits] == [41, 42, 43]  # vLLM's rule: sample j gets seed + j
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 15)


def test_a_batch_of_prompts_times_n_is_numbered_prompt_major(env: Env) -> None:
    prompts = ["first prompt", "the second one"]
    response = env.client().completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2)
    ids = [env.tokenizer(p).input_ids for p in prompts]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [env.expected(ids[i // 2], 4) for i in range(4)]
    assert [s.prompt_token_ids for s in _submits(env, response.id)] == [ids[0], ids[0], ids[1], ids[1]]
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids[0]) + len(ids[1]), 16)
    tokens = [[3, 4, 5], [6, 7]]
    response = env.client().completions.create(model=MODEL, prompt=tokens, max_tokens=3)
    assert [c.text for c in response.choices] == [env.expected(t, 3) for t in tokens]


def test_streamed_choices_carry_their_index_and_usage_sums(env: Env) -> None:
    env.backend.token_delay = 0.01  # choices interleave
    prompts = ["stream one", "stream two"]
    stream = env.client().completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, n=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str | None]] = defaultdict(list)
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.text
        finishes[choice.index].append(choice.finish_reason)
    ids = [env.tokenizer(p).input_ids for p in prompts]
    assert dict(texts) == {i: env.expected(ids[i // 2], 6) for i in range(4)}
    assert all(f[-1] == "length" and not any(f[:-1]) for f in finishes.values()), finishes
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids[0]) + len(ids[1]), 24)
    chat = env.client().chat.completions.create(model=MODEL, messages=USER, max_tokens=3, n=2, stream=True)
    roles = [c.choices[0].index for c in chat if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_one_failing_choice_fails_the_request_and_aborts_the_others(env: Env) -> None:
    env.backend.mode = "error"
    with pytest.raises(openai.APIStatusError) as bad:
        env.client().completions.create(model=MODEL, prompt="fails", max_tokens=8, n=2)
    assert bad.value.status_code == 502


def test_echo_prepends_the_prompt(env: Env) -> None:
    prompt = "echo this"
    ids = env.tokenizer(prompt).input_ids
    response = env.client().completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True)
    assert response.choices[0].text == prompt + env.expected(ids, 3)
    tokens = [7, 8, 9]
    response = env.client().completions.create(model=MODEL, prompt=tokens, max_tokens=3, echo=True)
    assert response.choices[0].text == env.tokenizer.decode(tokens) + env.expected(tokens, 3)
    stream = env.client().completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, stream=True)
    chunks = [c.choices[0].text for c in stream]
    assert chunks[0] == prompt and "".join(chunks) == prompt + env.expected(ids, 3)


def test_chat_generation_prompt_and_continuation(env: Env) -> None:
    messages: list[Any] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}]

    def template(**kwargs: Any) -> list[int]:
        text = env.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        ids: list[int] = env.tokenizer(text, add_special_tokens=False).input_ids
        return ids

    cases = [
        ({"add_generation_prompt": False}, template(add_generation_prompt=False)),
        ({"add_generation_prompt": False, "continue_final_message": True}, template(continue_final_message=True)),
        ({}, template(add_generation_prompt=True)),
    ]
    assert len({tuple(ids) for _, ids in cases}) == 3, "the three prompts must differ for this test to mean much"
    for extra, expected in cases:
        response = env.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body=extra)
        [submit] = _submits(env, response.id)
        assert submit.prompt_token_ids == expected, extra


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_aborts_every_choice(env: Env, stream: bool) -> None:
    env.backend.token_delay = 0.05  # 200 tokens would take 10 s
    body = {"model": MODEL, "prompt": ["leave one", "leave two"], "max_tokens": 200, "n": 2, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if stream:
        with httpx.stream("POST", f"{env.url}/v1/completions", json=body, headers=headers, timeout=10) as r:
            request_id = r.headers["x-request-id"]
            next(line for line in r.iter_lines() if line.startswith("data: "))
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{env.url}/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(10, read=0.5))
        request_id = env.backend.submits[-1].request_id.rsplit("-", 1)[0]
    for index in range(4):
        assert env.backend.wait_abort(f"{request_id}-{index}").reason == "client disconnected"


def test_a_refused_choice_refuses_the_request_and_aborts_those_accepted(env: Env) -> None:
    env.backend.mode = "refuse_choice_1"
    env.backend.token_delay = 0.05
    with pytest.raises(openai.RateLimitError):
        env.client().completions.create(model=MODEL, prompt="refused", max_tokens=100, n=3)
    first = env.backend.submits[-2].request_id
    assert first.endswith("-0") and env.backend.submits[-1].request_id.endswith("-1")  # choice 2 never submitted
    assert "refused" in env.backend.wait_abort(first).reason


def test_best_of_equal_to_n_is_served(env: Env) -> None:
    response = env.client().completions.create(model=MODEL, prompt="best", max_tokens=2, n=2, best_of=2)
    assert [c.index for c in response.choices] == [0, 1]
    response = env.client().completions.create(model=MODEL, prompt="best", max_tokens=2, best_of=1)
    assert len(response.choices) == 1


def _vllm_prompt_logprobs(env: Env, prompt: list[int], top: int) -> list[Any]:
    """What the gateway must make of the stand-in's prompt logprobs, in vLLM's shape."""
    sent = standin_prompt_logprobs(prompt, top)
    shaped: list[Any] = [None]
    for token, logprob, row in zip(prompt[1:], sent.logprobs, sent.top, strict=True):
        ranked = [t for t, _ in row]
        rank = ranked.index(token) + 1 if token in ranked else None
        entries = {str(token): (logprob, rank)}
        for i, (t, value) in enumerate(row):
            entries.setdefault(str(t), (value, i + 1))
        shaped.append(
            {
                k: {"logprob": v, "rank": r, "decoded_token": env.tokenizer.decode([int(k)])}
                for k, (v, r) in entries.items()
            }
        )
    return shaped


def test_vllm_prompt_logprobs_come_with_each_choice(env: Env) -> None:
    """vLLM's `prompt_logprobs`: the prefill instance's values reach each choice as vLLM shapes them
    (null for the first token; the prompt's token with its rank when it is one of the alternatives)."""
    ids = env.tokenizer("the prompt's logprobs").input_ids
    for top in (0, 1, 3):
        body = {"model": MODEL, "prompt": "the prompt's logprobs", "max_tokens": 2, "n": 2, "prompt_logprobs": top}
        response: Any = env.client().post("/completions", body=body, cast_to=object)
        [first, _] = _submits(env, response["id"])
        assert first.sampling.prompt_logprobs == top and first.sampling.logprobs is None
        expected = _vllm_prompt_logprobs(env, ids, top)
        assert [c["prompt_logprobs"] for c in response["choices"]] == [expected, expected]
        assert [c["logprobs"] for c in response["choices"]] == [None, None]
    plain: Any = env.client().post(
        "/completions", body={"model": MODEL, "prompt": "x", "max_tokens": 1}, cast_to=object
    )
    assert plain["choices"][0]["prompt_logprobs"] is None


def test_streamed_prompt_logprobs_come_in_each_choices_first_chunk_with_the_echo(env: Env) -> None:
    """Echoed, the prompt's text comes with its logprobs in the choice's first chunk rather than in a
    chunk of its own (they come from the prefill instance with the first token)."""
    prompt = "stream the prompt"
    ids = env.tokenizer(prompt).input_ids
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 3,
        "n": 2,
        "echo": True,
        "prompt_logprobs": 2,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{env.url}/v1/completions", json=body, headers=headers, timeout=10) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert lines[-1] == "[DONE]"
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[0]["prompt_logprobs"] == _vllm_prompt_logprobs(env, ids, 2)
        assert mine[0]["text"].startswith(prompt) and "".join(c["text"] for c in mine) == prompt + env.expected(ids, 3)
        assert all(c["prompt_logprobs"] is None for c in mine[1:])


def test_prompt_logprobs_lost_in_transit_fail_the_request(env: Env) -> None:
    env.backend.mode = "lose_prompt"
    with pytest.raises(openai.APIStatusError) as bad:
        env.client().completions.create(model=MODEL, prompt="lost", max_tokens=2, extra_body={"prompt_logprobs": 1})
    assert bad.value.status_code == 502 and "prompt's logprobs" in bad.value.message
    env.backend.wait_abort(env.backend.submits[-1].request_id)


def test_echo_with_logprobs_covers_the_prompt_then_the_output(env: Env) -> None:
    """OpenAI's legacy shape: the prompt's tokens lead `logprobs`, the first with null (no context),
    the others with the prefill instance's values; offsets run through the echoed text. A stream
    sends the echoed prompt with its logprobs in each choice's first chunk."""
    prompt = "echo these logprobs"
    ids = env.tokenizer(prompt).input_ids
    out = standin_tokens(ids, 3, env.vocab)
    decode = lambda t: env.tokenizer.decode([t])  # noqa: E731
    sent = standin_prompt_logprobs(ids, 1)
    tokens = [decode(t) for t in ids + out]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(ids))]
    offsets += [len(prompt) + sum(len(t) for t in tokens[len(ids) : i]) for i in range(len(ids), len(tokens))]
    expected = {
        "tokens": tokens,
        "token_logprobs": [None, *sent.logprobs, -0.25, -0.25, -0.25],
        "top_logprobs": [
            None,
            *({decode(t): v for t, v in row} for row in sent.top),
            *({decode(t): -0.25} for t in out),
        ],
        "text_offset": offsets,
    }
    response = env.client().completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1)
    [submit] = _submits(env, response.id)
    assert submit.sampling.prompt_logprobs == 1 and submit.sampling.logprobs == 1
    [choice] = response.choices
    assert choice.text == prompt + env.expected(ids, 3)
    assert choice.logprobs is not None and choice.logprobs.model_dump() == expected
    stream = env.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, stream=True
    )
    chunks = [c.choices[0] for c in stream]
    assert chunks[0].text.startswith(prompt) and "".join(c.text for c in chunks) == choice.text
    merged: dict[str, list[Any]] = defaultdict(list)
    for c in chunks:
        if c.logprobs is not None:
            for key, values in c.logprobs.model_dump().items():
                merged[key] += values
    assert dict(merged) == expected

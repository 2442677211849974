"""The gateway alone: real NATS, real HTTP (uvicorn), the official openai client, a stand-in backend.

The harness (the stand-in, the gateway thread, the `env` fixture) lives in gateway_harness.py,
shared with the other gateway test modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import openai
import pytest

from common.natsd import free_port
from services.gateway.settings import GatewaySettings
from tests.integration.gateway_harness import API_KEY, MODEL, PREFIX, Env, GatewayThread
from tests.integration.gateway_harness import _reset_backend as _reset_backend  # autouse: normal mode, no delay
from tests.integration.gateway_harness import env as env  # the module fixture, a fresh instance for this module


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


# ---- generation --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_completion_text_is_the_decode_of_the_backend_tokens(env: Env) -> None:
    prompt = "the cache of the decode"
    response = env.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, seed=7, extra_body={"top_k": 5, "ignore_eos": True}
    )
    ids = env.tokenizer(prompt).input_ids
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.choices[0].text == env.expected(ids, 8)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 8)
    submit = next(s for s in env.backend.submits if s.request_id == response.id)
    assert submit.prompt_token_ids == ids and submit.token_subject.startswith(f"{PREFIX}.gateway.")
    s = submit.sampling
    assert (s.max_new_tokens, s.temperature, s.seed, s.top_k, s.ignore_eos, s.logprobs) == (8, 0.0, 7, 5, True, None)


@pytest.mark.timeout(60)
def test_completion_defaults_to_16_tokens_and_takes_token_ids(env: Env) -> None:
    ids = [0, *env.tokenizer("scheduler and kernel", add_special_tokens=False).input_ids]
    response = env.client().completions.create(model=MODEL, prompt=ids)
    assert response.choices[0].text == env.expected(ids, 16)
    assert response.usage is not None and response.usage.completion_tokens == 16


@pytest.mark.timeout(60)
def test_completion_stream_with_usage(env: Env) -> None:
    prompt = "a batch of memory"
    stream = env.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    ids = env.tokenizer(prompt).input_ids
    text_chunks = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == env.expected(ids, 12)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 12, len(ids) + 12)


@pytest.mark.timeout(60)
def test_stream_framing_is_exactly_openais(env: Env) -> None:
    body = {"model": MODEL, "prompt": "frame", "max_tokens": 3, "stream": True}
    r = httpx.post(f"{env.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    for event in events[:-2]:
        assert event.startswith(b"data: {") and b"\n" not in event and b"\r" not in event
        assert json.loads(event[len(b"data: ") :])["object"] == "text_completion"


@pytest.mark.timeout(60)
def test_chat_applies_the_template(env: Env) -> None:
    messages: list[Any] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a block?"}]
    response = env.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    ids = env.chat_prompt(messages)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == env.expected(ids, 10)
    assert response.choices[0].finish_reason == "length"
    submit = next(s for s in env.backend.submits if s.request_id == response.id)
    assert submit.prompt_token_ids == ids


@pytest.mark.timeout(60)
def test_chat_stream_with_usage(env: Env) -> None:
    messages: list[Any] = [{"role": "user", "content": "stream me some tokens"}]
    stream = env.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == env.expected(env.chat_prompt(messages), 9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


@pytest.mark.timeout(60)
def test_logprobs_in_both_shapes(env: Env) -> None:
    completion = env.client().completions.create(model=MODEL, prompt="the engine", max_tokens=4, logprobs=2)
    lp = completion.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs == [-0.25] * 4 and lp.top_logprobs
    assert len(lp.tokens) == 4 and all(len(top) == 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == completion.choices[0].text
    chat = env.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [c.logprob for c in content] == [-0.25] * 3
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert env.backend.submits[-1].sampling.logprobs == 2


# ---- stop strings ------------------------------------------------------------------------------
def _stop_case(env: Env, prompt: str, n: int) -> tuple[str, str]:
    """A stop string from the middle of the stand-in's output, and the text cut before its first match."""
    full = env.expected(env.tokenizer(prompt).input_ids, n)
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    cut = full.find(stop)
    assert cut > 0, (full, stop)
    return stop, full[:cut]


@pytest.mark.timeout(60)
def test_stop_string_truncates_and_aborts_the_backend(env: Env) -> None:
    env.backend.token_delay = 0.02  # still generating when the stop string appears
    prompt = "stop me in the middle"
    stop, expected = _stop_case(env, prompt, 40)
    response = env.client().completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=[stop, "never-seen"])
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "stop"
    assert env.backend.wait_abort(response.id).reason == "stop string"


@pytest.mark.timeout(60)
def test_stop_string_in_a_stream_never_shows_its_start(env: Env) -> None:
    env.backend.token_delay = 0.02
    prompt = "stream until the stop"
    stop, expected = _stop_case(env, prompt, 40)
    stream = env.client().completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=stop, stream=True)
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    env.backend.wait_abort(chunks[0].id)


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_invalid_parameters_are_400_naming_the_field(env: Env) -> None:
    client = env.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert _error(bad.value)["param"] == "temperature"
    assert _error(bad.value)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="")
    assert _error(bad.value)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=[5] * 2048)
    assert (_error(bad.value)["param"], _error(bad.value)["code"]) == ("prompt", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    assert (_error(bad.value)["param"], _error(bad.value)["code"]) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=["one", [2, 3]])  # type: ignore[list-item]
    assert "all strings or all lists" in _error(bad.value)["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=30, logprobs=True
        )
    assert _error(bad.value)["param"] == "top_logprobs"


@pytest.mark.timeout(60)
def test_malformed_bodies_are_400_in_openai_shape(env: Env) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    cases = [
        (b"{not json", None),
        (b'{"model": "m", "prompt": "x", "temperature": "hot"}', "temperature"),
        (b'{"model": "m"}', "prompt"),
        (b'{"model": "m", "prompt": 3}', "prompt"),
    ]
    for body, param in cases:
        r = httpx.post(f"{env.url}/v1/completions", content=body, headers=headers, timeout=10)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param, error
        assert error["code"] is None


@pytest.mark.timeout(60)
def test_unknown_model_is_404(env: Env) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        env.client().completions.create(model="gpt-17", prompt="x")
    assert (_error(nf.value)["code"], _error(nf.value)["param"]) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        env.client().chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert [m.id for m in env.client().models.list()] == [MODEL]


@pytest.mark.timeout(60)
def test_a_full_cluster_is_429(env: Env) -> None:
    env.backend.mode = "refuse"
    with pytest.raises(openai.RateLimitError) as full:
        env.client().completions.create(model=MODEL, prompt="x")
    assert full.value.status_code == 429 and full.value.response.headers["Retry-After"] == "1"
    assert _error(full.value)["message"] == "the cluster is full, retry later"


@pytest.mark.timeout(60)
def test_a_gateway_at_its_concurrency_limit_is_429_with_retry_after(env: Env) -> None:
    one = GatewayThread(
        GatewaySettings(
            nats_url=env.backend.nats_url,
            model=str(env.model),
            port=free_port(),
            subjects_prefix=PREFIX,
            max_concurrent_requests=1,
        )
    )
    one.start()
    try:
        env.backend.token_delay = 0.05  # the first request streams for a while
        client = env.client(url=one.url)
        stream = client.completions.create(model=MODEL, prompt="first", max_tokens=200, stream=True)
        next(iter(stream))  # it is in flight
        with pytest.raises(openai.RateLimitError) as full:
            client.completions.create(model=MODEL, prompt="second", max_tokens=2)
        assert full.value.response.headers["Retry-After"] == "1"
        assert _error(full.value)["code"] == "too_many_requests"
        stream.close()  # the client leaves: its slot frees
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.completions.create(model=MODEL, prompt="third", max_tokens=2).choices[0].text
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot of a request that ended never came back"
                time.sleep(0.05)
    finally:
        one.stop()


@pytest.mark.timeout(60)
def test_health_is_ready_only_while_the_cluster_can_serve(env: Env) -> None:
    assert httpx.get(f"{env.url}/health", timeout=10).json() == {"status": "ok"}
    env.backend.mode = "no_decode"
    deadline = time.monotonic() + 10  # past the gateway's readiness cache (READINESS_TTL_S)
    while (health := httpx.get(f"{env.url}/health", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "/health still 200 with no decode instance"
    assert health.status_code == 503 and health.json() == {"status": "unavailable", "missing": ["decode"]}
    assert httpx.get(f"{env.url}/live", timeout=10).status_code == 200
    env.backend.mode = "normal"  # and ready again, before the next test looks
    while httpx.get(f"{env.url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline + 10, "/health did not come back"


@pytest.mark.timeout(60)
def test_no_scheduler_is_503_and_keys_are_optional(env: Env) -> None:
    client = env.client(key="anything", url=env.bare_url)
    with pytest.raises(openai.InternalServerError) as down:
        client.completions.create(model=MODEL, prompt="x")
    assert down.value.status_code == 503 and "no scheduler" in _error(down.value)["message"]
    assert [m.id for m in client.models.list()] == [MODEL]  # no API keys configured: no auth asked
    health = httpx.get(f"{env.bare_url}/health", timeout=10)  # not ready: a request would fail
    assert health.status_code == 503 and health.json() == {"status": "unavailable", "missing": ["scheduler"]}
    assert httpx.get(f"{env.bare_url}/live", timeout=10).status_code == 200  # but alive: nothing to restart


@pytest.mark.timeout(60)
def test_api_keys_are_required_when_configured(env: Env) -> None:
    with pytest.raises(openai.AuthenticationError) as denied:
        env.client(key="sk-wrong").completions.create(model=MODEL, prompt="x")
    assert _error(denied.value)["code"] == "invalid_api_key"
    r = httpx.get(f"{env.url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{env.url}/health", timeout=10).status_code == 200  # not under /v1


# ---- failures after acceptance -----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_backend_error_is_502_or_an_error_event(env: Env) -> None:
    env.backend.mode = "error"
    with pytest.raises(openai.InternalServerError) as failed:
        env.client().completions.create(model=MODEL, prompt="x", max_tokens=8)
    assert failed.value.status_code == 502 and "decode instance lost" in _error(failed.value)["message"]
    stream = env.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8, stream=True
    )
    with pytest.raises(openai.APIError, match="decode instance lost"):
        list(stream)


@pytest.mark.timeout(60)
def test_tokens_from_two_publishers_are_put_in_order(env: Env) -> None:
    env.backend.mode = "normal"
    expected = env.client().completions.create(model=MODEL, prompt="order", max_tokens=6).choices[0].text
    env.backend.mode = "swap"  # token 1 before token 0, as prefill's and decode's may cross
    assert env.client().completions.create(model=MODEL, prompt="order", max_tokens=6).choices[0].text == expected
    stream = env.client().completions.create(model=MODEL, prompt="order", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


@pytest.mark.timeout(60)
def test_a_token_lost_in_transit_fails_the_request_instead_of_leaving_a_gap(env: Env) -> None:
    env.backend.mode = "lose"
    with pytest.raises(openai.InternalServerError) as lost:
        env.client().completions.create(model=MODEL, prompt="x", max_tokens=8)
    assert lost.value.status_code == 502 and "lost in transit" in _error(lost.value)["message"]
    assert env.backend.wait_abort(env.backend.submits[-1].request_id).reason == "tokens lost in transit"
    stream = env.client().completions.create(model=MODEL, prompt="x", max_tokens=8, stream=True)
    with pytest.raises(openai.APIError, match="lost in transit"):
        list(stream)


@pytest.mark.timeout(60)
def test_a_request_held_for_room_outlives_the_token_timeout(env: Env) -> None:
    """Keep-alive events (a decode instance's, for a request waiting for room) are no tokens, and
    they keep the token timeout from failing a request that is only waiting."""
    env.backend.mode = "normal"
    expected = env.client().completions.create(model=MODEL, prompt="x", max_tokens=6).choices[0].text
    env.backend.mode = "held"
    try:
        held = env.client().completions.create(model=MODEL, prompt="x", max_tokens=6)
        assert held.choices[0].text == expected and held.usage is not None and held.usage.completion_tokens == 6
        stream = env.client().completions.create(model=MODEL, prompt="x", max_tokens=6, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected
    finally:
        env.backend.mode = "normal"
    assert not [a for a in env.backend.aborts if a.request_id in {s.request_id for s in env.backend.submits[-2:]}]


@pytest.mark.timeout(60)
def test_a_silent_backend_times_out_and_is_aborted(env: Env) -> None:
    env.backend.mode = "silent"
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as silent:
        env.client().completions.create(model=MODEL, prompt="x")
    assert silent.value.status_code == 504 and _error(silent.value)["code"] == "timeout"
    assert time.monotonic() - start < 10
    request_id = env.backend.submits[-1].request_id
    assert env.backend.wait_abort(request_id).reason == "token timeout"
    stream = env.client().completions.create(model=MODEL, prompt="x", stream=True)
    with pytest.raises(openai.APIError, match="no token"):
        list(stream)
    env.backend.wait_abort(env.backend.submits[-1].request_id)


@pytest.mark.timeout(60)
def test_a_client_leaving_a_stream_aborts_the_backend(env: Env) -> None:
    env.backend.token_delay = 0.05  # 200 tokens would take 10 s
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 200, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{env.url}/v1/completions", json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        request_id = r.headers["x-request-id"]
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["id"] == request_id
    assert env.backend.wait_abort(request_id).reason == "client disconnected"


@pytest.mark.timeout(60)
def test_a_client_leaving_a_plain_request_aborts_the_backend(env: Env) -> None:
    """The client hangs up once its request reached the backend (not after a fixed time: a loaded
    machine can take longer than that to get it there, and the request seen would be another's)."""
    env.backend.token_delay = 0.05  # 200 tokens: 10 s, far longer than the wait below
    body = {"model": MODEL, "prompt": "another long story", "max_tokens": 200}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = len(env.backend.submits)

    async def leave_once_submitted() -> str:
        async with httpx.AsyncClient(timeout=30) as client:
            post = asyncio.create_task(client.post(f"{env.url}/v1/completions", json=body, headers=headers))
            while len(env.backend.submits) == before:
                assert not post.done(), post.result()
                await asyncio.sleep(0.01)
            post.cancel()  # closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await post
        return env.backend.submits[before].request_id

    request_id = asyncio.run(leave_once_submitted())
    assert env.backend.wait_abort(request_id, timeout=30).reason == "client disconnected"


# ---- operations --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_metrics_health_and_schema(env: Env) -> None:
    env.client().completions.create(model=MODEL, prompt="count me", max_tokens=3)
    metrics = httpx.get(f"{env.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "adrenaline_gateway_time_to_first_token_seconds_bucket",
        "adrenaline_gateway_time_per_output_token_seconds_bucket",
        "adrenaline_gateway_inflight_requests",
        'adrenaline_gateway_requests_total{endpoint="/v1/completions",status="200"}',
    ):
        assert name in metrics.text, name
    scraped = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in metrics.text.splitlines()
        if line.startswith("vllm:")
    }
    label = f'{{model_name="{MODEL}"}}'  # vLLM's names, for dashboards built for vLLM
    assert scraped[f"vllm:time_to_first_token_seconds_count{label}"] >= 1
    assert scraped[f"vllm:e2e_request_latency_seconds_count{label}"] >= 1
    assert scraped[f"vllm:time_per_output_token_seconds_count{label}"] >= 1
    assert scraped[f"vllm:generation_tokens_total{label}"] >= 3
    assert scraped[f"vllm:prompt_tokens_total{label}"] >= 2
    assert httpx.get(f"{env.url}/health", timeout=10).status_code == 200
    schema = httpx.get(f"{env.url}/schema/openapi.json", timeout=10)
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)

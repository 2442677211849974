"""The gateway alone: real NATS, real HTTP (uvicorn), the official openai client, a stand-in backend.

The gateway's contract with the cluster is only its NATS messages (SubmitRequest/SubmitReply,
TokenBatch, AbortRequest), so a stand-in that speaks them lets every gateway behaviour be tested
here, including the failures (refusal, backend error, silence) a real cluster makes hard to
provoke on demand. One NATS server, one model folder and two gateways serve the whole module:
one with API keys and a 1.5 s token timeout in front of the stand-in, and a bare one with nothing
listening on its submit subject.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

from common.bus import Bus, Reply
from common.messages import (
    AbortRequest,
    ClusterStatus,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
)
from common.model.tiny import make_tiny
from common.natsd import NatsServer, free_port
from common.subjects import Subjects
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

PREFIX = "gwtest"
API_KEY = "sk-test-key"
MODEL = "m"  # the served name: the model folder's name
FIRST_MERGE = 259  # ids below are special tokens and single bytes; merges decode to whole ASCII words


def standin_tokens(prompt: list[int], n: int, vocab: int) -> list[int]:
    """The stand-in's deterministic output for a prompt: merge tokens only, so the text is readable."""
    start = sum(prompt) % 997
    return [FIRST_MERGE + (start + 17 * i) % (vocab - FIRST_MERGE) for i in range(n)]


class StandInBackend:
    """Stands in for scheduler + prefill + decode, to test the gateway alone over its real NATS messages.

    It answers `Subjects(prefix).submit` and publishes `standin_tokens` for the prompt to the
    request's token subject, one TokenBatch per token (`token_delay` apart), the last with
    finish_reason "length". `mode` makes it misbehave on purpose: "refuse" (429; "refuse_choice_1"
    only a request's choice 1), "error" (an
    "error" event after two tokens), "silent" (accepts, then sends nothing). It records every
    submit and every AbortRequest, and stops generating a request once it is aborted.
    """

    def __init__(self, nats_url: str, prefix: str, vocab: int) -> None:
        self.nats_url, self.subjects, self.vocab = nats_url, Subjects(prefix), vocab
        self.mode = "normal"
        self.token_delay = 0.0
        self.submits: list[SubmitRequest] = []
        self.aborts: list[AbortRequest] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stand-in", daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self.bus: Bus | None = None

    def start(self) -> None:
        self._thread.start()
        self._call(self._connect()).result(timeout=10)

    def stop(self) -> None:
        if self.bus is not None:
            self._call(self.bus.close()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _connect(self) -> None:
        self.bus = await Bus.connect(self.nats_url, "stand-in")
        await self.bus.subscribe(self.subjects.submit, SubmitRequest, self._on_submit, queue="scheduler")
        await self.bus.subscribe(self.subjects.abort, AbortRequest, self._on_abort)
        await self.bus.subscribe(self.subjects.status, StatusRequest, self._on_status, queue="scheduler")
        await self.bus.flush()

    async def _on_status(self, msg: StatusRequest, reply: Reply | None) -> None:
        assert reply is not None
        decode = [] if self.mode == "no_decode" else ["stand-in"]
        await reply(ClusterStatus(prefill=["stand-in"], decode=decode, inflight=len(self._tasks)))

    async def _on_submit(self, msg: SubmitRequest, reply: Reply | None) -> None:
        assert reply is not None
        self.submits.append(msg)
        if self.mode == "refuse" or (self.mode == "refuse_choice_1" and msg.request_id.endswith("-1")):
            await reply(SubmitReply(msg.request_id, False, 429, "the cluster is full, retry later"))
            return
        await reply(SubmitReply(msg.request_id, True, decode_id="stand-in"))
        if self.mode != "silent":
            task = asyncio.get_running_loop().create_task(self._generate(msg, self.mode, self.token_delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _generate(self, msg: SubmitRequest, mode: str, delay: float) -> None:
        assert self.bus is not None
        n = msg.sampling.max_new_tokens
        for i, token in enumerate(standin_tokens(msg.prompt_token_ids, n, self.vocab)):
            if self.aborted(msg.request_id):
                return
            if mode == "error" and i == 2:
                event = TokenEvent(msg.request_id, [], finish_reason="error", error="decode instance lost")
                await self.bus.publish(msg.token_subject, TokenBatch([event]))
                return
            top = msg.sampling.logprobs
            event = TokenEvent(
                msg.request_id,
                [token],
                [-0.25] if top is not None else [],
                [[(token, -0.25), *((FIRST_MERGE + j, -3.0 - j) for j in range(top - 1))][:top]] if top else [],
                "length" if i == n - 1 else None,
            )
            await self.bus.publish(msg.token_subject, TokenBatch([event]))
            await asyncio.sleep(delay)

    async def _on_abort(self, msg: AbortRequest, reply: Reply | None) -> None:
        self.aborts.append(msg)

    def aborted(self, request_id: str) -> bool:
        return any(a.request_id == request_id for a in self.aborts)

    def wait_abort(self, request_id: str, timeout: float = 5.0) -> AbortRequest:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for a in self.aborts:
                if a.request_id == request_id:
                    return a
            time.sleep(0.02)
        raise AssertionError(f"no AbortRequest for {request_id}; got {self.aborts}")


class GatewayThread:
    """The real app under uvicorn, in a background thread, on a free port."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.url = f"http://{settings.host}:{settings.port}"
        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{settings.port}", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Env:
    tokenizer: Any
    backend: StandInBackend
    url: str  # the gateway in front of the stand-in (API keys on)
    bare_url: str  # a gateway with nothing behind it (no API keys)
    vocab: int
    model: Path
    clients: dict[tuple[str, str], openai.OpenAI] = field(default_factory=dict)

    def client(self, key: str = API_KEY, url: str = "") -> openai.OpenAI:
        """A client per (gateway, key), closed at the end of the module. No retries: a 429 or 5xx must
        reach the test as it was sent."""
        url = url or self.url
        if (url, key) not in self.clients:
            self.clients[url, key] = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)
        return self.clients[url, key]

    def expected(self, prompt: list[int], n: int) -> str:
        return str(self.tokenizer.decode(standin_tokens(prompt, n, self.vocab), skip_special_tokens=True))

    def chat_prompt(self, messages: list[Any]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    model: Path = make_tiny(tmp_path_factory.mktemp("gateway") / MODEL, "llama")
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    vocab = len(tokenizer)
    with NatsServer() as nats:
        backend = StandInBackend(nats.url, PREFIX, vocab)
        backend.start()
        main = GatewayThread(
            GatewaySettings(
                nats_url=nats.url,
                model=str(model),
                port=free_port(),
                api_keys=(API_KEY,),
                submit_timeout=2.0,
                token_timeout=1.5,
                subjects_prefix=PREFIX,
            )
        )
        bare = GatewayThread(
            GatewaySettings(
                nats_url=nats.url, model=str(model), port=free_port(), submit_timeout=2.0, subjects_prefix="nobody-home"
            )
        )
        main.start()
        bare.start()
        env = Env(tokenizer, backend, main.url, bare.url, vocab, model)
        try:
            yield env
        finally:
            for client in env.clients.values():
                client.close()
            main.stop()
            bare.stop()
            backend.stop()


@pytest.fixture(autouse=True)
def _reset_backend(env: Env) -> Iterator[None]:
    env.backend.mode, env.backend.token_delay = "normal", 0.0
    yield
    env.backend.mode, env.backend.token_delay = "normal", 0.0


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
    env.backend.token_delay = 0.05
    body = {"model": MODEL, "prompt": "another long story", "max_tokens": 200}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{env.url}/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(10, read=0.5))
    request_id = env.backend.submits[-1].request_id
    assert env.backend.wait_abort(request_id).reason == "client disconnected"


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

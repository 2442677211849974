"""The harness every gateway test module shares: a real NATS server, the real app under uvicorn, a stand-in backend.

The gateway's contract with the cluster is only its NATS messages (SubmitRequest/SubmitReply,
TokenBatch, AbortRequest), so a stand-in that speaks them lets every gateway behaviour be tested
without model engines, including the failures (refusal, backend error, silence) a real cluster
makes hard to provoke on demand. A test module takes the `env` fixture (and the autouse
`_reset_backend`) by importing them: each module gets its own NATS server, model folder and two
gateways, one with API keys and a 1.5 s token timeout in front of the stand-in, and a bare one
with nothing listening on its submit subject.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from common.request import PromptLogprobs
from common.subjects import Subjects
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.runtime import prompt_logprob_events

PREFIX = "gwtest"
API_KEY = "sk-test-key"
MODEL = "m"  # the served name: the model folder's name
FIRST_MERGE = 259  # ids below are special tokens and single bytes; merges decode to whole ASCII words
TOKEN_TIMEOUT_S = 1.5  # the gateways' ADRENALINE_TOKEN_TIMEOUT_S here
HELD_S = 2 * TOKEN_TIMEOUT_S  # how long the "held" stand-in keeps a request waiting
HELD_EVERY_S = 0.25  # its keep-alive interval (the decode's is common.messages.KEEPALIVE_S)


def standin_tokens(prompt: list[int], n: int, vocab: int) -> list[int]:
    """The stand-in's deterministic output for a prompt: merge tokens only, so the text is readable."""
    start = sum(prompt) % 997
    return [FIRST_MERGE + (start + 17 * i) % (vocab - FIRST_MERGE) for i in range(n)]


def standin_prompt_logprobs(prompt: list[int], top: int) -> PromptLogprobs:
    """The stand-in's prompt logprobs: prompt token j + 1 at -(j + 1) / 8, ranked second behind a merge
    token (so that it has a rank when `top` >= 2, and none when fewer alternatives are asked for)."""
    logprobs = [-(j + 1) / 8 for j in range(len(prompt) - 1)]
    rows = [
        [(FIRST_MERGE + j % 7, -0.0625), (t, lp), *((FIRST_MERGE + 10 + i, -5.0 - i) for i in range(top))][:top]
        for j, (t, lp) in enumerate(zip(prompt[1:], logprobs, strict=True))
    ]
    return PromptLogprobs(logprobs, rows)


def _top_logprobs(token: int, top: int) -> list[tuple[int, float]]:
    """The stand-in's `top` alternatives for a token: the token itself first, at the logprob it reports."""
    return [(token, -0.25), *((FIRST_MERGE + j, -3.0 - j) for j in range(top - 1))][:top]


class StandInBackend:
    """Stands in for scheduler + prefill + decode, to test the gateway alone over its real NATS messages.

    It answers `Subjects(prefix).submit` and publishes `standin_tokens` for the prompt to the
    request's token subject, one TokenBatch per token (`token_delay` apart), the last with
    finish_reason "length"; with `burst`, all of them in one event (a fuzzer's thousands of tokens
    per request then cost one message). A request that asks for its prompt's logprobs gets
    `standin_prompt_logprobs` first, as a prefill instance sends them. `mode` makes it misbehave on
    purpose: "refuse" (429; "refuse_choice_1" only a request's choice 1), "error" (an
    "error" event after two tokens), "silent" (accepts, then sends nothing), "lose_prompt" (the
    prompt's logprobs never arrive), "held" (keep-alive events only, `HELD_S` of them, twice the
    gateway's token timeout, as a decode instance sends for a request waiting for room, then
    the tokens). It records every
    submit and every AbortRequest, and stops generating a request once it is aborted.
    """

    def __init__(self, nats_url: str, prefix: str, vocab: int) -> None:
        self.nats_url, self.subjects, self.vocab = nats_url, Subjects(prefix), vocab
        self.mode = "normal"
        self.token_delay = 0.0
        self.burst = False
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
        top = msg.sampling.logprobs
        if msg.sampling.prompt_logprobs is not None and mode != "lose_prompt":
            prompt = standin_prompt_logprobs(msg.prompt_token_ids, msg.sampling.prompt_logprobs)
            for event in prompt_logprob_events(msg.request_id, prompt):
                await self.bus.publish(msg.token_subject, TokenBatch([event]))
        if self.burst and mode == "normal":
            tokens = standin_tokens(msg.prompt_token_ids, n, self.vocab)
            event = TokenEvent(
                msg.request_id,
                tokens,
                [-0.25] * n if top is not None else [],
                [_top_logprobs(t, top) for t in tokens] if top else [],
                "length",
            )
            await self.bus.publish(msg.token_subject, TokenBatch([event]))
            return
        if mode == "held":
            for _ in range(int(HELD_S / HELD_EVERY_S)):
                await self.bus.publish(msg.token_subject, TokenBatch([TokenEvent(msg.request_id, [])]))
                await asyncio.sleep(HELD_EVERY_S)
        events = []
        for i, token in enumerate(standin_tokens(msg.prompt_token_ids, n, self.vocab)):
            events.append(
                TokenEvent(
                    msg.request_id,
                    [token],
                    [-0.25] if top is not None else [],
                    [_top_logprobs(token, top)] if top else [],
                    "length" if i == n - 1 else None,
                    first_index=i,
                )
            )
        if mode == "swap" and n >= 2:  # the first two arrive the wrong way round (two publishers)
            events[0], events[1] = events[1], events[0]
        for i, event in enumerate(events):
            if self.aborted(msg.request_id):
                return
            if mode == "error" and i == 2:
                event = TokenEvent(msg.request_id, [], finish_reason="error", error="decode instance lost")
                await self.bus.publish(msg.token_subject, TokenBatch([event]))
                return
            if mode == "lose" and i == 2:  # in flight when a NATS server died: never delivered
                continue
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
                token_timeout=TOKEN_TIMEOUT_S,
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
    env.backend.mode, env.backend.token_delay, env.backend.burst = "normal", 0.0, False
    yield
    env.backend.mode, env.backend.token_delay, env.backend.burst = "normal", 0.0, False

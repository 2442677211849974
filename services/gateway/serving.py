"""One generation request from submit to its last byte, as a JSON body or as server-sent events.

Both endpoints share this path; `Job.chat` only changes the shape of what is sent. A request
with several choices (`n` > 1, a batch of prompts) submits one cluster request per choice and
merges their outputs: a JSON body once all have ended, or a stream whose chunks carry their
choice's index, interleaved as they come. Whatever ends a choice (its last token, a stop string,
an error, a silent backend, a client that left, a cancelled handler, another choice's failure)
goes through `Run.finish` exactly once, which frees its queue, aborts the backend if it may
still be generating, and records its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from litestar import Request, Response
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from common.messages import TokenEvent
from services.gateway import openai_types as oa
from services.gateway.backend import BackendClient, Generation
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics, RequestTimer
from services.gateway.responses import Choice, Outcome, Shapes, usage
from services.gateway.text import Piece, TextStream

log = structlog.get_logger("gateway")


@dataclass(frozen=True)
class Job:
    """A validated request, ready to submit."""

    chat: bool
    model: str
    choices: list[Choice]
    stop: list[str]
    stream: bool
    include_usage: bool
    include_stop: bool = False  # vLLM's include_stop_str_in_output
    skip_special_tokens: bool = True
    request_id: str = field(default="")
    created: int = field(default_factory=oa.now)

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}")

    def backend_id(self, choice: Choice) -> str:
        """The cluster's id for a choice: the request's own when it is the only one."""
        return self.request_id if len(self.choices) == 1 else f"{self.request_id}-{choice.index}"

    @property
    def logprobs(self) -> bool:
        return self.choices[0].sampling.logprobs is not None


class Run:
    """One submitted choice: its token events, the text made of them, its timings."""

    def __init__(
        self,
        job: Job,
        choice: Choice,
        generation: Generation,
        text: TextStream,
        timer: RequestTimer,
        metrics: GatewayMetrics,
    ) -> None:
        self.job = job
        self.choice = choice
        self.generation = generation
        self.text = text
        self.timer = timer
        self.metrics = metrics
        self._done = False
        # the prompt's logprobs, if asked for: they come before the first token (`_take_prompt`)
        self.prompt = Piece(token_ids=choice.prompt) if choice.sampling.prompt_logprobs is not None else None
        metrics.inflight.inc()

    async def next_piece(self) -> Piece:
        """Wait for the next text the client may see (possibly empty when the choice ends)."""
        while True:
            event = await self.generation.next()
            if self.prompt is not None:
                self._take_prompt(event)
            self.timer.tokens_arrived(len(event.token_ids))
            piece = self.text.add(event)
            if self.text.stopped_by_string:
                self.generation.close("stop string")  # the backend knows nothing of stop strings
            if piece.text or self.text.finished:
                return piece

    def _take_prompt(self, event: TokenEvent) -> None:
        """Collect the prompt's logprobs, which the prefill instance sends in order, all before its
        first token (one publisher: NATS keeps its order); by then all of them must be here, else a
        message was lost (NATS delivers at most once) and the request fails rather than answer
        with a gap."""
        assert self.prompt is not None
        self.prompt.logprobs += event.prompt_logprobs
        self.prompt.top_logprobs += event.prompt_top_logprobs
        if event.token_ids and event.first_index == 0 and len(self.prompt.logprobs) != len(self.choice.prompt) - 1:
            self.generation.close("prompt logprobs lost in transit")
            raise APIError(
                502,
                f"the prompt's logprobs came incomplete ({len(self.prompt.logprobs)} of "
                f"{len(self.choice.prompt) - 1}): lost in transit; retry the request",
                code="backend_error",
            )

    async def outcome(self) -> Outcome:
        """Wait for the whole output."""
        pieces = []
        while not self.text.finished:
            pieces.append(await self.next_piece())
        merged = Piece(
            self.text.text,
            [t for p in pieces for t in p.token_ids],
            [x for p in pieces for x in p.logprobs],
            [x for p in pieces for x in p.top_logprobs],
        )
        return Outcome(self.choice, merged, self.text.finish_reason, len(self.text.token_ids), self.prompt)

    def finish(self, reason: str) -> None:
        """End the choice once: stop routing, abort the backend unless it already ended it, record it."""
        if self._done:
            return
        self._done = True
        self.generation.close(reason)
        self.timer.finished()
        self.metrics.inflight.dec()
        log.info(
            "finished",
            request_id=self.generation.request_id,
            finish_reason=self.text.finish_reason,
            reason=reason or None,
            prompt_tokens=len(self.choice.prompt),
            completion_tokens=len(self.text.token_ids),
        )


class Server:
    """Submits jobs and answers them in OpenAI's shapes."""

    def __init__(self, backend: BackendClient, tokenizer: Any, metrics: GatewayMetrics) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.metrics = metrics

    async def serve(self, request: Request[Any, Any, Any], job: Job) -> Response[Any]:
        log.info(
            "request",
            request_id=job.request_id,
            chat=job.chat,
            choices=len(job.choices),
            prompt_tokens=len(job.choices[0].prompt),
            max_tokens=job.choices[0].sampling.max_new_tokens,
            stream=job.stream,
        )
        runs = await self._submit(job, time.perf_counter())
        shapes = Shapes(self.tokenizer, job.chat, job.request_id, job.created, job.model)
        headers = {"X-Request-Id": job.request_id}
        if job.stream:
            return ClosingStream(
                self._events(job, runs, shapes),
                on_close=lambda: _finish_all(runs, "client disconnected"),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        return Response(await self._unless_disconnected(request, job, runs, shapes), headers=headers)

    async def _submit(self, job: Job, arrived: float) -> list[Run]:
        """One cluster request per choice; if one is refused, those already accepted are aborted."""
        runs: list[Run] = []
        try:
            for choice in job.choices:
                generation = await self.backend.submit(job.backend_id(choice), choice.prompt, choice.sampling)
                # a prompt's tokens are counted once, however many samples it has
                timer = RequestTimer(self.metrics, len(choice.prompt) if choice.sample == 0 else 0, arrived)
                text = TextStream(
                    self.tokenizer,
                    job.stop,
                    include_stop=job.include_stop,
                    skip_special_tokens=job.skip_special_tokens,
                    min_tokens=choice.sampling.min_tokens,
                )
                runs.append(Run(job, choice, generation, text, timer, self.metrics))
        except BaseException:
            _finish_all(runs, "another choice of the request was refused")
            raise
        return runs

    async def _unless_disconnected(
        self, request: Request[Any, Any, Any], job: Job, runs: list[Run], shapes: Shapes
    ) -> Any:
        """Collect every choice's output, unless the client leaves first (then abort the backend at once)."""
        collect: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(r.outcome() for r in runs)))
        gone: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(request))
        reason = "handler cancelled"  # what the backend hears if we leave this block early
        try:
            await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
            if collect.done():
                reason = "gateway error"
                outcomes = collect.result()  # raises a choice's APIError, if one failed
                reason = ""
                return shapes.body(outcomes, job.logprobs)
            reason = "client disconnected"
            log.info("client disconnected", request_id=job.request_id)
            raise APIError(499, "client disconnected")  # nobody reads it; the status shows in the metrics
        finally:
            for task in (collect, gone):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(collect, gone, return_exceptions=True)
            _finish_all(runs, reason)

    async def _events(self, job: Job, runs: list[Run], shapes: Shapes) -> AsyncIterator[bytes]:
        """The SSE body. Cancelled or closed early (the client left): `finally` aborts the backend."""
        reason = "client disconnected"
        pieces = _pieces(runs)
        try:
            for run in runs:
                opening = shapes.opening(run.choice)
                if opening is not None:
                    yield oa.sse(opening)
            async for run, piece, offset, finish_reason in pieces:
                prompt = run.prompt if offset == 0 else None  # a choice's first piece (text comes with any after)
                yield oa.sse(shapes.chunk(run.choice, piece, offset, finish_reason, job.logprobs, prompt))
            if job.include_usage:
                completion_tokens = sum(len(run.text.token_ids) for run in runs)
                yield oa.sse(shapes.usage_chunk(usage([run.choice for run in runs], completion_tokens)))
            yield oa.SSE_DONE
            reason = ""
        except APIError as exc:  # the response has started: the error travels as an event
            reason = exc.message
            log.warning("stream failed", request_id=job.request_id, status=exc.status, error=exc.message)
            yield oa.sse(exc.body())
        finally:
            await pieces.aclose()
            _finish_all(runs, reason)


_Item = tuple[Run, Piece, int, str | None]  # a run, its piece, where its text starts, how it ended if it did


async def _next(run: Run) -> _Item:
    offset = len(run.text.text)
    piece = await run.next_piece()
    return run, piece, offset, run.text.finish_reason


def _finish_all(runs: list[Run], reason: str) -> None:
    for run in runs:
        run.finish(reason)


async def _pieces(runs: list[Run]) -> AsyncGenerator[_Item, None]:
    """Every run's pieces as they come, until all have ended; the first error of any run is raised.
    One run is read directly, several through a queue fed by a task per run."""
    if len(runs) == 1:
        (run,) = runs
        while not run.text.finished:
            yield await _next(run)
        return
    queue: asyncio.Queue[_Item | APIError] = asyncio.Queue()

    async def pump(run: Run) -> None:
        try:
            while not run.text.finished:
                queue.put_nowait(await _next(run))
        except APIError as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        left = len(runs)
        while left:
            item = await queue.get()
            if isinstance(item, APIError):
                raise item
            left -= item[3] is not None
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClosingStream(Stream):
    """A `Stream` that calls `on_close` however its response ends: sent, failed, cancelled, or never started.

    The SSE generator's own `finally` covers a client that leaves while we wait for tokens, but not
    one that leaves before the body starts (the generator never runs) or while a chunk is being
    sent (the generator sits at a `yield` until garbage collection): this covers both.
    """

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        inner = super().to_asgi_response(*args, **kwargs)
        on_close = self.on_close

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await inner(scope, receive, send)
            finally:
                on_close()

        return cast(ASGIResponse, respond)  # Litestar only calls it, as any ASGI app


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Return when the client closes the connection (the body has been read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""One generation request from submit to its last byte, as a JSON body or as server-sent events.

Both endpoints share this path; `Job.chat` only changes the shape of what is sent. Whatever
ends a request (its last token, a stop string, an error, a silent backend, a client that left,
a cancelled handler) goes through `Run.finish` exactly once, which frees the request's queue,
aborts the backend if it may still be generating, and records the request's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from litestar import Request, Response
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from common.messages import Sampling
from services.gateway import openai_types as oa
from services.gateway.backend import BackendClient, Generation
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics, RequestTimer
from services.gateway.text import Piece, TextStream, chat_logprobs, completion_logprobs

log = structlog.get_logger("gateway")


@dataclass(frozen=True)
class Job:
    """A validated request, ready to submit."""

    chat: bool
    model: str
    prompt: list[int]
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool
    request_id: str = field(default="")
    created: int = field(default_factory=oa.now)

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}")


class Run:
    """A submitted job: its token events, the text made of them, its timings."""

    def __init__(
        self, job: Job, generation: Generation, text: TextStream, timer: RequestTimer, metrics: GatewayMetrics
    ) -> None:
        self.job = job
        self.generation = generation
        self.text = text
        self.timer = timer
        self.metrics = metrics
        self._done = False

    async def next_piece(self) -> Piece:
        """Wait for the next text the client may see (possibly empty when the request ends)."""
        while True:
            event = await self.generation.next()
            self.timer.tokens_arrived(len(event.token_ids))
            piece = self.text.add(event)
            if self.text.stopped_by_string:
                self.generation.close("stop string")  # the backend knows nothing of stop strings
            if piece.text or self.text.finished:
                return piece

    def usage(self) -> oa.Usage:
        prompt, completion = len(self.job.prompt), len(self.text.token_ids)
        return oa.Usage(prompt, completion, prompt + completion)

    def finish(self, reason: str) -> None:
        """End the request once: stop routing, abort the backend unless it already ended it, record it."""
        if self._done:
            return
        self._done = True
        self.generation.close(reason)
        self.timer.finished()
        self.metrics.inflight.dec()
        log.info(
            "finished",
            request_id=self.job.request_id,
            finish_reason=self.text.finish_reason,
            reason=reason or None,
            prompt_tokens=len(self.job.prompt),
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
            prompt_tokens=len(job.prompt),
            max_tokens=job.sampling.max_new_tokens,
            stream=job.stream,
        )
        arrived = time.perf_counter()
        generation = await self.backend.submit(job.request_id, job.prompt, job.sampling)
        timer = RequestTimer(self.metrics, len(job.prompt), arrived)
        self.metrics.inflight.inc()
        run = Run(job, generation, TextStream(self.tokenizer, job.stop), timer, self.metrics)
        headers = {"X-Request-Id": job.request_id}
        if job.stream:
            return ClosingStream(
                self._events(run),
                on_close=lambda: run.finish("client disconnected"),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        return Response(await self._unless_disconnected(request, run), headers=headers)

    async def _unless_disconnected(self, request: Request[Any, Any, Any], run: Run) -> Any:
        """Collect the whole output, unless the client leaves first (then abort the backend at once)."""
        collect = asyncio.ensure_future(self._collect(run))
        gone = asyncio.ensure_future(_disconnected(request))
        reason = "handler cancelled"  # what the backend hears if we leave this block early
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collect.done():
                reason = "gateway error"
                result = collect.result()  # raises the request's APIError, if it failed
                reason = ""
                return result
            reason = "client disconnected"
            raise APIError(499, "client disconnected")  # nobody reads it; the status shows in the metrics
        finally:
            for task in (collect, gone):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(collect, gone, return_exceptions=True)
            run.finish(reason)

    async def _collect(self, run: Run) -> oa.CompletionResponse | oa.ChatCompletionResponse:
        pieces = []
        while not run.text.finished:
            pieces.append(await run.next_piece())
        merged = Piece(
            run.text.text,
            [t for p in pieces for t in p.token_ids],
            [x for p in pieces for x in p.logprobs],
            [x for p in pieces for x in p.top_logprobs],
        )
        job, reason = run.job, run.text.finish_reason
        if job.chat:
            logprobs = chat_logprobs(self.tokenizer, merged) if job.sampling.logprobs is not None else None
            choice = oa.ChatChoice(0, oa.ChatMessageOut(merged.text), logprobs, reason)
            return oa.ChatCompletionResponse(job.request_id, job.created, job.model, [choice], run.usage())
        logprobs = completion_logprobs(self.tokenizer, merged, 0) if job.sampling.logprobs is not None else None
        text_choice = oa.CompletionChoice(0, merged.text, logprobs, reason)
        return oa.CompletionResponse(job.request_id, job.created, job.model, [text_choice], run.usage())

    async def _events(self, run: Run) -> AsyncIterator[bytes]:
        """The SSE body. Cancelled or closed early (the client left): `finally` aborts the backend."""
        job, reason = run.job, "client disconnected"
        try:
            if job.chat:
                yield oa.sse(self._chunk(run, Piece(), None, role=True))
            while not run.text.finished:
                offset = len(run.text.text)
                piece = await run.next_piece()
                yield oa.sse(self._chunk(run, piece, offset))
            if job.include_usage:
                yield oa.sse(self._usage_chunk(run))
            yield oa.SSE_DONE
            reason = ""
        except APIError as exc:  # the response has started: the error travels as an event
            reason = exc.message
            log.warning("stream failed", request_id=job.request_id, status=exc.status, error=exc.message)
            yield oa.sse(exc.body())
        finally:
            run.finish(reason)

    def _chunk(self, run: Run, piece: Piece, offset: int | None, role: bool = False) -> Any:
        job, reason = run.job, run.text.finish_reason
        usage = None  # with include_usage, every chunk but the last says "usage": null
        logprobs = None
        if job.chat:
            if job.sampling.logprobs is not None and piece.token_ids:
                logprobs = chat_logprobs(self.tokenizer, piece)
            delta = oa.Delta(role="assistant", content="") if role else oa.Delta(content=piece.text or None)
            choice = oa.ChatChunkChoice(0, delta, logprobs, None if role else reason)
            return oa.ChatCompletionChunk(job.request_id, job.created, job.model, [choice], usage)
        if job.sampling.logprobs is not None and piece.token_ids:
            logprobs = completion_logprobs(self.tokenizer, piece, offset or 0)
        text_choice = oa.CompletionChoice(0, piece.text, logprobs, reason)
        return oa.CompletionResponse(job.request_id, job.created, job.model, [text_choice], usage)

    def _usage_chunk(self, run: Run) -> Any:
        job = run.job
        if job.chat:
            return oa.ChatCompletionChunk(job.request_id, job.created, job.model, [], run.usage())
        return oa.CompletionResponse(job.request_id, job.created, job.model, [], run.usage())


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

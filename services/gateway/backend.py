"""The gateway's side of the control plane: submit a request, then receive its tokens.

Token events for every request this gateway owns arrive on ONE subscription,
`subjects.tokens(gateway_id)`, as `TokenBatch`es (one message per engine step, not one per
request); each event is routed to its request's queue by id. Events for ids we no longer hold
(a request that ended on a stop string, a client that left) are dropped: the backend may still
send a step or two before our abort reaches it. Events for ids this process never held are
another matter: they are requests of an earlier process under the same gateway id (killed, then
restarted by its supervisor), whose clients are gone with it. Nothing else would stop them
before their `max_tokens`, so each is aborted once, when its first event arrives.

A gateway that dies and never comes back under its id (compose draws a random one per process)
cannot abort its requests itself: it publishes a `GatewayHeartbeat` every `heartbeat_s`, and the
scheduler aborts the requests of a gateway it no longer hears (`ADRENALINE_GATEWAY_DEAD_AFTER_S`).

A request never hangs: the scheduler must answer the submit within `submit_timeout`, and each
token event must follow the previous one within `token_timeout` (a request waiting for room on
an instance gets an empty event every `KEEPALIVE_S`, so waiting is not dying); either failure ends the request
with an error and, once the request is accepted, an `AbortRequest` so the backend frees its KV.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import structlog
from nats.aio.subscription import Subscription

from common.bus import Bus, Reply, ServiceUnavailable
from common.messages import (
    AbortRequest,
    ClusterStatus,
    GatewayHeartbeat,
    MessageError,
    Sampling,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
)
from services.gateway.errors import APIError, too_many
from services.gateway.settings import GatewaySettings

log = structlog.get_logger("gateway")

READINESS_TTL_S = 0.5  # how long one answer of the scheduler serves /health, and how long it may take
# Ids of requests this process held and let go (or aborted as an earlier process's), remembered so
# that their late events are not taken for an earlier process's requests; the oldest go first.
REMEMBERED_IDS = 100_000


GAP_GRACE_S = 2.0  # how long an event ahead of a missing one waits for it (`Generation`)


class Generation:
    """One accepted request's token events, in order; `close` it when done, whatever happened.

    Events are put in output order by their `first_index`: the first token comes from the prefill
    instance and the rest from the decode instance, two publishers whose messages a NATS cluster
    may deliver in either order. An event ahead of one not yet here waits up to `GAP_GRACE_S` for
    it; if it never comes (NATS delivers at most once: a server that died with it in flight lost
    it), the request fails with an error rather than complete with a token missing.
    """

    def __init__(self, backend: BackendClient, request_id: str, queue: asyncio.Queue[TokenEvent]) -> None:
        self.backend = backend
        self.request_id = request_id
        self._queue = queue
        self.finished = False  # the backend ended the request (or we aborted it): no abort is owed
        self.received = 0  # output tokens handed out so far
        self._early: dict[int, TokenEvent] = {}  # events that came before an earlier one, by first_index

    async def next(self) -> TokenEvent:
        """The next event (the last one carries a finish_reason); APIError on a backend error, a
        silence, or a lost event.

        A method rather than an async generator, so that a cancelled caller leaves no suspended
        generator behind whose clean-up would run at some later garbage collection.
        """
        if self.finished:
            raise RuntimeError(f"{self.request_id}: no more events after the request ended")
        while True:
            waiting = self._early.pop(self.received, None)
            if waiting is not None:
                return self._take(waiting)
            timeout = GAP_GRACE_S if self._early else self.backend.settings.token_timeout
            try:
                # not asyncio.wait_for: before Python 3.12 it swallows a cancellation that comes as the
                # queue yields an event, and a client's disconnect then waited for the whole output
                async with asyncio.timeout(timeout):
                    event = await self._queue.get()
            except TimeoutError:
                if self._early:
                    self.close("tokens lost in transit")
                    lost = min(self._early) - self.received
                    raise APIError(
                        502,
                        f"{lost} token(s) of this request were lost in transit; it was stopped rather than "
                        "returned with a gap (retry it)",
                        code="backend_error",
                    ) from None
                self.close("token timeout")
                timeout = self.backend.settings.token_timeout
                raise APIError(504, f"no token from the backend within {timeout} s", code="timeout") from None
            if event.finish_reason in ("error", "abort"):
                self.finished = True  # the backend ended it: no abort is owed
                self.close("")
                message = event.error or "the request was aborted by the backend"
                raise APIError(502, f"the backend failed this request: {message}", code="backend_error")
            if event.keeps_alive:  # the request waits on an instance that holds it: wait again
                continue
            if event.token_ids and event.first_index > self.received:  # ahead of one still on its way
                self._early[event.first_index] = event
                continue
            if event.token_ids and event.first_index < self.received:  # already handed out: never twice
                continue
            return self._take(event)

    def _take(self, event: TokenEvent) -> TokenEvent:
        self.received += len(event.token_ids)
        if event.finish_reason is not None:
            self.finished = True
        return event

    def close(self, reason: str) -> None:
        """Stop routing this request's events; if it is still running, tell the backend why it should stop."""
        self.backend.release(self.request_id)
        if not self.finished:
            self.finished = True
            self.backend.abort(self.request_id, reason)


class BackendClient:
    """One NATS connection per gateway, with the token subscription that feeds every request's queue."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.bus: Bus | None = None
        self._subscription: Subscription | None = None
        self._queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._known: OrderedDict[str, None] = OrderedDict()  # ids held once, no longer (REMEMBERED_IDS)
        self._pending: set[asyncio.Task[None]] = set()  # abort publishes in flight; held so they are not collected
        self._readiness: tuple[float, list[str]] = (-READINESS_TTL_S, [])  # (when asked, what was missing)
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.bus is not None and self.bus.client.is_connected

    @property
    def inflight(self) -> int:
        return len(self._queues)

    async def missing(self) -> list[str]:
        """What the cluster lacks to serve a request now ([] when nothing): "nats", "scheduler",
        "prefill", "decode". Asked of the scheduler at most every READINESS_TTL_S, however often a
        load balancer probes."""
        now = time.monotonic()
        if now - self._readiness[0] < READINESS_TTL_S:
            return self._readiness[1]
        if self.bus is None or not self.connected:
            missing = ["nats"]
        else:
            try:
                status = await self.bus.request(self.subjects.status, StatusRequest(), ClusterStatus, READINESS_TTL_S)
                missing = [role for role in ("prefill", "decode") if not getattr(status, role)]
            except (ServiceUnavailable, MessageError):
                missing = ["scheduler"]
        self._readiness = (time.monotonic(), missing)
        return missing

    async def start(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, self.settings.gateway_id, self.settings.nats)
        token_subject = self.subjects.tokens(self.settings.gateway_id)
        self._subscription = await self.bus.subscribe(token_subject, TokenBatch, self._on_tokens)
        await self.bus.flush()  # the subscription is live at the server before the first submit names it
        # The first heartbeat goes before any submit, so the scheduler judges every request of ours.
        heartbeat = GatewayHeartbeat(self.settings.gateway_id, token_subject)
        await self.bus.publish(self.subjects.gateway_heartbeat, heartbeat)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(self.bus, heartbeat))
        log.info("connected", nats_url=self.settings.nats_url, token_subject=token_subject)

    async def _beat(self, bus: Bus, heartbeat: GatewayHeartbeat) -> None:
        """Tell the scheduler we are alive every `heartbeat_s`, until closed; a reconnecting NATS
        client's failures are logged and the beat goes on."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await bus.publish(self.subjects.gateway_heartbeat, heartbeat)
            except Exception as exc:
                log.warning("heartbeat not published", error=str(exc))

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        for request_id in list(self._queues):
            self.abort(request_id, "gateway shutting down")
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        if self.bus is not None:
            await self.bus.close()
            self.bus = None

    async def _on_tokens(self, batch: TokenBatch, reply: Reply | None) -> None:
        for event in batch.events:
            queue = self._queues.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)
            elif event.finish_reason is None and event.request_id not in self._known:
                # Still running, and never ours: an earlier process under our id took it and died.
                self._remember(event.request_id)
                self.abort(event.request_id, "the gateway that took it is gone (restarted)")

    def _remember(self, request_id: str) -> None:
        self._known[request_id] = None
        if len(self._known) > REMEMBERED_IDS:
            self._known.popitem(last=False)

    async def submit(self, request_id: str, prompt: list[int], sampling: Sampling) -> Generation:
        """Hand the request to the scheduler; raise APIError (503, 429, 400...) when it is not accepted."""
        if self.bus is None or not self.connected:
            raise APIError(503, "the gateway is not connected to the cluster", code="service_unavailable")
        limit = self.settings.max_concurrent_requests
        if limit and len(self._queues) >= limit:
            raise too_many(f"this gateway serves at most {limit} requests at once; retry later", "too_many_requests")
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._queues[request_id] = queue  # before the submit: the first token may beat the reply
        token_subject = self.subjects.tokens(self.settings.gateway_id)
        message = SubmitRequest(request_id, prompt, sampling, token_subject)
        try:
            reply = await self.bus.request(self.subjects.submit, message, SubmitReply, self.settings.submit_timeout)
        except ServiceUnavailable as exc:
            self.release(request_id)
            # A reply that never came may still be a request the scheduler routed: make sure it stops.
            self.abort(request_id, "submit timed out")
            raise APIError(503, f"no scheduler answered: {exc}", code="service_unavailable") from None
        except BaseException:
            self.release(request_id)
            self.abort(request_id, "submit cancelled")
            raise
        if not reply.accepted:
            self.release(request_id)
            status = reply.status if 400 <= reply.status < 600 else 503
            if status == 429:
                raise too_many(reply.error or "the cluster is full; retry later")
            raise APIError(status, reply.error or "the scheduler refused the request")
        log.info("accepted", request_id=request_id, prefill_id=reply.prefill_id, decode_id=reply.decode_id)
        return Generation(self, request_id, queue)

    def release(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is not None:
            self._remember(request_id)

    def abort(self, request_id: str, reason: str) -> None:
        """Publish an AbortRequest without waiting: this runs in `finally` blocks of cancelled tasks."""
        if self.bus is None:
            return
        log.info("abort", request_id=request_id, reason=reason)
        task = asyncio.get_running_loop().create_task(self._publish_abort(self.bus, AbortRequest(request_id, reason)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish_abort(self, bus: Bus, message: AbortRequest) -> None:
        try:
            await bus.publish(self.subjects.abort, message)
        except Exception as exc:  # a closed or reconnecting connection: the backend's own timeouts take over
            log.warning("abort not published", request_id=message.request_id, error=str(exc))

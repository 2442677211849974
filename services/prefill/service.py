"""The prefill instance: batches prompts, samples each first token, hands the KV to a decode instance.

Engine state is touched only on the event loop between steps (NATS handlers queue work into
`inbox`); the step itself runs in a worker thread so NATS and UCX keep being served while the
model computes. After each step every prefilled request is detached: its prompt KV is gathered
into one tensor, its blocks are freed, and a hand-off task sends it to the chosen decode
instance, so the prefill pool only ever holds the batch being computed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
import torch

from common import metrics
from common.bus import Bus, Reply, ServiceUnavailable
from common.engine import Engine, StepOutput
from common.errors import AdrenalineError, InvalidRequestError
from common.keepalive import KeepAlive
from common.kv_transfer import gather_kv
from common.messages import (
    AbortRequest,
    Ack,
    InstanceLoad,
    KVHandoff,
    PrefillTask,
    SubmitRequest,
    TokenEvent,
)
from common.sampling import from_wire
from common.tags import handoff_tags
from common.tensor_channel import TensorChannel
from services.runtime import (
    InstanceSettings,
    Tombstones,
    engine_load,
    heartbeat,
    prompt_logprob_events,
    publish_events,
    step,
    token_event,
    wait_for_work,
    waiting_at,
)


class _Refused(AdrenalineError):
    """A hand-off's target said no before any KV moved (so another target may still take it)."""


log = structlog.get_logger("prefill")


@dataclass
class _Task:
    task: PrefillTask
    aborted: bool = False


class PrefillService:
    def __init__(self, settings: InstanceSettings, engine: Engine, bus: Bus, channel: TensorChannel) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.engine = engine
        self.bus = bus
        self.channel = channel
        self.tasks: dict[str, _Task] = {}
        self.inbox: list[PrefillTask] = []
        self.aborts: list[str] = []
        self.wake = asyncio.Event()
        self.handoffs: set[asyncio.Task[None]] = set()
        self.aborted = Tombstones()
        self._tags = handoff_tags(settings.instance_id)
        # A queue of long prompts (or requests preempted for room) can outlast the gateway's token timeout.
        self.keepalive = KeepAlive(bus)

    def _token_subject(self, request_id: str) -> str | None:
        entry = self.tasks.get(request_id)
        return entry.task.request.token_subject if entry is not None else None

    def load(self) -> InstanceLoad:
        return engine_load(self.settings, "prefill", self.engine, self.channel.address, len(self.inbox))

    async def on_task(self, task: PrefillTask, reply: Reply | None) -> None:
        request = task.request
        try:
            self.engine.validate(request.prompt_token_ids, from_wire(request.sampling))
            if request.request_id in self.tasks:
                raise InvalidRequestError("request_id", f"{request.request_id!r} is already in use")
            if request.request_id in self.aborted:
                raise InvalidRequestError("request_id", f"{request.request_id!r} was aborted")
        except InvalidRequestError as exc:
            if reply:
                await reply(Ack(False, str(exc)))
            return
        self.tasks[request.request_id] = _Task(task)
        self.inbox.append(task)
        self.wake.set()
        if reply:
            await reply(Ack(True))

    async def on_abort(self, abort: AbortRequest, reply: Reply | None) -> None:
        self.aborted.add(abort.request_id)
        if abort.request_id in self.tasks:
            self.tasks[abort.request_id].aborted = True
            self.aborts.append(abort.request_id)
            self.wake.set()

    def _apply_inbox(self) -> None:
        for task in self.inbox:
            r = task.request
            if not self.tasks[r.request_id].aborted:
                self.engine.add_request(r.request_id, r.prompt_token_ids, from_wire(r.sampling), r.output_token_ids)
        self.inbox.clear()
        for request_id in self.aborts:
            self.engine.abort(request_id)
            self.tasks.pop(request_id, None)
        self.aborts.clear()

    async def serve(self, stop: asyncio.Event) -> None:
        subs = [
            await self.bus.subscribe(
                self.subjects.instance(self.settings.instance_id, "prefill"), PrefillTask, self.on_task
            ),
            await self.bus.subscribe(self.subjects.abort, AbortRequest, self.on_abort),
        ]
        beat = asyncio.create_task(heartbeat(self.bus, self.subjects, self.load, self.settings.heartbeat_s))
        log.info("prefill instance ready", instance_id=self.settings.instance_id)
        try:
            while not stop.is_set():
                self._apply_inbox()
                if not self.engine.has_unfinished():
                    await wait_for_work(self.wake, stop)
                    continue
                outputs = await step(self.engine)
                await self._after_step(outputs)
                await self.keepalive.tick(waiting_at(self.engine), self._token_subject)
        finally:
            beat.cancel()
            for sub in subs:
                await sub.unsubscribe()
            for handoff in self.handoffs:
                handoff.cancel()

    async def _after_step(self, outputs: list[StepOutput]) -> None:
        events: dict[str, list[TokenEvent]] = {}
        for out in outputs:
            entry = self.tasks.get(out.request_id)
            if entry is None:
                continue
            request = entry.task.request
            if out.prompt_logprobs is not None:  # before the first token: the gateway has them all by then
                await publish_events(
                    self.bus,
                    self.subjects,
                    {request.token_subject: prompt_logprob_events(out.request_id, out.prompt_logprobs)},
                )
            finished = out.finish_reason is not None
            events.setdefault(request.token_subject, []).append(token_event(out))
            if finished:
                self.tasks.pop(out.request_id, None)
                continue
            num_kv = request.num_tokens  # the prompt's, and a resumed request's output before this token
            slots = torch.tensor(self.engine.blocks.slots(out.request_id, 0, num_kv), dtype=torch.int64)
            kv = gather_kv(self.engine.pool, slots.to(self.engine.device))
            self.engine.detach(out.request_id)
            handoff = asyncio.create_task(self._handoff(entry.task, out.token_id, kv))
            self.handoffs.add(handoff)
            handoff.add_done_callback(self.handoffs.discard)
        await publish_events(self.bus, self.subjects, events)

    async def _handoff(self, task: PrefillTask, first_token: int, kv: torch.Tensor) -> None:
        """Ship the prompt KV to where the request will decode: its decode instance, or, for an
        offloaded request, its attention executor (which hands the request to the decode instance
        once the KV has landed)."""
        request = task.request
        bound = log.bind(request_id=request.request_id, decode_id=task.decode_id, executor_id=task.executor_id)
        start = time.perf_counter()
        try:
            sent = await self._offload(task, first_token, kv) if task.executor_id else None
            if sent is None:  # not offloaded, or its executor said no before any KV moved
                sent = await self._send_kv(request, first_token, kv, task.decode_id, task.decode_address)
            metrics.TRANSFER_BYTES.labels("send").inc(sent)
            metrics.TRANSFER_SECONDS.labels("send").observe(time.perf_counter() - start)
            bound.info("kv handed off", bytes=sent, tokens=kv.shape[2])
        except (AdrenalineError, ServiceUnavailable) as exc:
            metrics.TRANSFER_FAILURES.inc()
            bound.warning("hand-off failed", error=str(exc))
            event = TokenEvent(request.request_id, [], finish_reason="error", error=f"KV hand-off failed: {exc}")
            await publish_events(self.bus, self.subjects, {request.token_subject: [event]})
            await self.bus.publish(self.subjects.abort, AbortRequest(request.request_id, "hand-off failed"))
        finally:
            self.tasks.pop(request.request_id, None)

    async def _offload(self, task: PrefillTask, first_token: int, kv: torch.Tensor) -> int | None:
        """KV to the executor, which tells the decode instance once it has landed; None if the
        executor refused or was gone before taking anything (full after all: the scheduler's view
        lags), so that the decode instance takes the request itself instead of it failing."""
        request = task.request
        try:
            return await self._send_kv(
                request, first_token, kv, task.executor_id, task.executor_address, decode_id=task.decode_id
            )
        except (_Refused, ServiceUnavailable) as exc:
            log.warning("executor refused; handing to decode", request_id=request.request_id, error=str(exc))
            return None

    async def _send_kv(
        self,
        request: SubmitRequest,
        first_token: int,
        kv: torch.Tensor,
        target: str,
        address: bytes,
        decode_id: str = "",
    ) -> int:
        """KVHandoff to `target` (it reserves room and posts the receive), then the KV over UCX;
        `decode_id` for an executor: where it hands the request on once the KV has landed."""
        tag = next(self._tags)
        handoff = KVHandoff(request, first_token, kv.shape[2], tag, self.channel.address, decode_id=decode_id)
        subject = self.subjects.instance(target, "handoff")
        ack = await self.bus.request(subject, handoff, Ack, timeout=self.settings.transfer_timeout_s)
        if not ack.accepted:
            raise _Refused(f"{target} refused the request: {ack.error}")
        if not ack.send_kv:  # no room there for a while: it recomputes the KV from the tokens
            return 0
        peer = await self.channel.connect(address)
        return await self.channel.send(peer, tag, [kv], timeout=self.settings.transfer_timeout_s)

"""The decode instance: admits hand-offs whose KV has landed and decodes them in one continuous batch.

A hand-off goes through three states, all changed on the event loop between steps:

    KVHandoff arrives -> blocks allocated, receive posted, ack sent    (pending)
    KV received       -> copied into the blocks, request joins the batch (running)
    receive fails     -> blocks freed, request ends with an error

An abort that arrives while the KV is in flight is deferred: the request is marked and its
blocks are freed once the receive completes or times out, never while UCX may still write
into them (the failure peers' users report: aborts racing transfers).

An offloaded request's hand-off comes from its attention executor, once the prompt KV has
landed there, and joins the batch at once; no seat for a while, and it is queued to recompute
here instead (the executor then frees its copy). A request its executor hands back later (full)
has lost its KV: it goes back to the scheduler with what it has generated (`Subjects.resume`), to
be recomputed on a prefill instance and placed again where room is, rather than recomputed here,
where that prompt-long step would stall the whole batch while this instance's memory is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
import torch

from common import metrics
from common.bus import Bus, Reply
from common.engine import Engine, StepOutput
from common.errors import InvalidRequestError, NoFreeBlocksError
from common.keepalive import KeepAlive
from common.kv_transfer import kv_shape, scatter_kv
from common.liveness import Hearing
from common.messages import (
    AbortRequest,
    Ack,
    Admitted,
    InstanceLoad,
    KVHandoff,
    SubmitRequest,
    TokenEvent,
)
from common.profiling import profile_decode_attention, profile_engine
from common.sampling import from_wire, to_wire
from common.step_model import StepModel
from common.tags import MAX_EXECUTORS
from common.tensor_channel import TensorChannel, TransferError
from services.decode.remote_executor import ExecutorFailed, RemoteExecutor
from services.decode.step_channel import StepChannel
from services.runtime import (
    InstanceSettings,
    Tombstones,
    engine_load,
    heartbeat,
    publish_events,
    step,
    token_event,
    wait_for_work,
    waiting_at,
)

log = structlog.get_logger("decode")
STALL_TTL_S = 10.0  # an executor-wait measurement older than this is forgotten (`stall_estimate`)


def stall_estimate(mean: float | None, measured_at: float, now: float) -> float | None:
    """The measured executor wait, or None once it is older than STALL_TTL_S: a wait measured
    under a load that has passed must not keep the policy from offloading forever (it would
    offload nothing, so nothing would measure again); unknown, the policy assumes a wait as long as
    the local attention (`services.scheduler.policy.decide`)."""
    if mean is None or now - measured_at > STALL_TTL_S:
        return None
    return mean


@dataclass
class _Pending:
    handoff: KVHandoff
    aborted: bool = False
    kv: torch.Tensor | None = None  # set once received
    failed: str = ""


@dataclass
class _Inbox:
    handoffs: list[tuple[KVHandoff, Reply | None]] = field(default_factory=list)
    landed: list[str] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


class DecodeService:
    def __init__(self, settings: InstanceSettings, engine: Engine, bus: Bus, channel: TensorChannel) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.engine = engine
        self.bus = bus
        self.channel = channel
        self.pending: dict[str, _Pending] = {}
        self.token_subjects: dict[str, str] = {}
        self.inbox = _Inbox()
        self.wake = asyncio.Event()
        self.receives: set[asyncio.Task[None]] = set()
        self.aborted = Tombstones()
        self.executor_slots = 0  # executors met so far; each gets its own slot in the step tags
        self.held: dict[str, float] = {}  # hand-offs waiting for room, and until when they may
        self.executor_seen: dict[str, float] = {}  # executors' last heartbeats
        self.keepalive = KeepAlive(bus)  # requests waiting here for room, told they are held
        self.step_model: StepModel | None = None  # profiled when serving starts
        self.attention_model: StepModel | None = None
        self.offload_stall_s: float | None = None  # moving mean over steps with offloaded rows
        self.stall_measured_at = 0.0  # when a step last had offloaded rows
        # Steps run on one thread, which owns the UCX worker of the per-layer round trips to executors.
        self.step_thread = ThreadPoolExecutor(1, thread_name_prefix="decode-step")
        self.step_channel = StepChannel(settings.ucx_net_devices)

    def load(self) -> InstanceLoad:
        """The heartbeat. Blocks allocated to hand-offs still in flight count as free here: the
        scheduler counts each routed request until this instance shows it admitted, and taking
        them off here too would hide that room twice."""
        load = engine_load(self.settings, "decode", self.engine, self.channel.address, len(self.pending))
        in_flight = sum(len(self.engine.blocks.block_table(rid)) for rid in self.pending if rid in self.engine.blocks)
        return dataclasses.replace(
            load,
            free_blocks=load.free_blocks + in_flight,
            step_model=self.step_model.to_wire() if self.step_model else [],
            attention_model=self.attention_model.to_wire() if self.attention_model else [],
            max_num_seqs=self.engine.config.max_num_seqs,
            offload_stall_s=self.current_stall(),
            lengths=[(r.request_id, r.num_tokens) for r in self.engine.running],
        )

    def current_stall(self) -> float | None:
        return stall_estimate(self.offload_stall_s, self.stall_measured_at, time.monotonic())

    # ---- NATS handlers: queue, never touch the engine --------------------------------------
    async def on_handoff(self, handoff: KVHandoff, reply: Reply | None) -> None:
        self.inbox.handoffs.append((handoff, reply))
        self.wake.set()

    async def on_load(self, load: InstanceLoad, reply: Reply | None) -> None:
        if load.role == "executor":
            self.executor_seen[load.instance_id] = time.monotonic()

    async def watch_executors(self) -> None:
        """Fail an executor whose heartbeats stopped (the scheduler's rule), so that a step waiting
        on it ends within about `dead_after_s` rather than at the transfer timeout. Silence counts
        only while this instance hears well (`common.liveness`): a NATS pause silences every
        executor while UCX, and so every step, still works."""
        s = self.settings
        hearing = Hearing(self.bus, s.subjects_prefix, s.dead_after_s, tick_s=s.heartbeat_s)
        await hearing.start()
        try:
            while True:
                await asyncio.sleep(s.heartbeat_s)
                await hearing.tick()
                if hearing.judging:
                    self._fail_silent_executors(hearing)
        finally:
            await hearing.stop()

    def _fail_silent_executors(self, hearing: Hearing) -> None:
        for name, client in list(self.engine.executors.items()):
            seen = self.executor_seen.setdefault(name, time.monotonic())
            if hearing.silent(seen) and isinstance(client, RemoteExecutor) and not client.failed:
                log.warning("executor silent", executor_id=name, silent_s=round(time.monotonic() - seen, 2))
                client.fail(f"no heartbeat for {self.settings.dead_after_s:g} s")

    async def on_abort(self, abort: AbortRequest, reply: Reply | None) -> None:
        self.inbox.aborts.append(abort.request_id)
        self.wake.set()

    # ---- between steps ---------------------------------------------------------------------
    async def _apply_inbox(self) -> None:
        handoffs, self.inbox.handoffs = self.inbox.handoffs, []
        now = time.monotonic()
        for handoff, reply in handoffs:
            self.held.setdefault(handoff.request.request_id, now + 0.5 * self.settings.transfer_timeout_s)
            ack = await self._accept(handoff)
            if ack is None:  # no room yet: hold it, running requests free blocks as they finish
                self.inbox.handoffs.append((handoff, reply))
                continue
            self.held.pop(handoff.request.request_id, None)
            if reply:
                await reply(ack)
        landed, self.inbox.landed = self.inbox.landed, []
        for request_id in landed:
            await self._admit(request_id)
        aborts, self.inbox.aborts = self.inbox.aborts, []
        for request_id in aborts:
            self.aborted.add(request_id)
            if request_id in self.pending:
                self.pending[request_id].aborted = True  # freed when the receive ends
            elif self.engine.abort(request_id):
                self.token_subjects.pop(request_id, None)

    async def _accept(self, handoff: KVHandoff) -> Ack | None:
        """Ack or refuse a hand-off; None while there is no room yet and it may still wait.

        The scheduler's view of free KV lags (heartbeats) and running requests grow, so a full
        cache at hand-off time is usually brief: the hand-off waits up to half the transfer
        timeout (the prefill instance waits for the ack that long at most) for blocks. Requests
        already queued here (preempted ones) come first: a hand-off never takes blocks from under
        them. An offloaded request's hand-off takes no block here (its KV stays on its executor)
        and joins the batch at once, whatever waits here; it used to wait behind them and then be
        recomputed here, its executor's copy freed. If there is still no room, the request is
        queued to recompute its KV here from its tokens, like a preempted one, and the prefill
        instance is told not to send it: a full cache delays a request, it never fails it.
        """
        request = handoff.request
        rid = request.request_id
        try:
            if rid in self.pending or rid in self.engine.requests:
                raise InvalidRequestError("request_id", f"{rid!r} is already here")
            if rid in self.aborted:
                raise InvalidRequestError("request_id", f"{rid!r} was aborted")
            params = from_wire(request.sampling)
            self.engine.validate(request.prompt_token_ids, params)
            seats = len(self.engine.running) + len(self.pending)
            if seats >= self.engine.config.max_num_seqs:  # max_num_seqs holds here too
                raise NoFreeBlocksError(self.engine.blocks.blocks_for(handoff.num_kv_tokens), 0)
            if handoff.executor_id:  # sent by the executor once the KV landed there: decode from now on
                try:
                    await self._admit_offloaded(handoff)
                except TransferError as exc:  # an address UCX cannot use: refuse, the executor frees the KV
                    return Ack(False, f"cannot reach executor {handoff.executor_id}: {exc}")
                return Ack(True)
            if self.engine.waiting:  # requests queued here come first for blocks (an offloaded one takes none)
                raise NoFreeBlocksError(self.engine.blocks.blocks_for(handoff.num_kv_tokens), 0)
            self.engine.blocks.allocate(rid, handoff.num_kv_tokens)
        except NoFreeBlocksError:
            if time.monotonic() < self.held.get(rid, 0.0):
                return None
            self.engine.add_waiting(
                rid, request.prompt_token_ids, handoff.first_token_id, params, request.output_token_ids
            )
            self.token_subjects[rid] = request.token_subject
            metrics.HANDOFFS_RECOMPUTED.inc()
            await self.bus.publish(self.subjects.admitted, Admitted(rid, self.settings.instance_id))
            log.info("queued to recompute", request_id=rid, kv_tokens=handoff.num_kv_tokens)
            return Ack(True, send_kv=False)  # from an executor: it frees its copy
        except InvalidRequestError as exc:
            return Ack(False, str(exc))
        self.pending[rid] = _Pending(handoff)
        receive = asyncio.create_task(self._receive(rid))
        self.receives.add(receive)
        receive.add_done_callback(self.receives.discard)
        return Ack(True)

    async def _receive(self, request_id: str) -> None:
        entry = self.pending[request_id]
        h = entry.handoff
        layout = self.engine.layout  # received straight into the engine's device (UCX moves device memory)
        kv = torch.empty(kv_shape(layout, h.num_kv_tokens), dtype=layout.dtype, device=self.engine.device)
        start = time.perf_counter()
        try:
            received = await self.channel.recv_into(h.tag, [kv], timeout=self.settings.transfer_timeout_s)
            entry.kv = kv
            metrics.TRANSFER_BYTES.labels("recv").inc(received)
            metrics.TRANSFER_SECONDS.labels("recv").observe(time.perf_counter() - start)
        except TransferError as exc:
            metrics.TRANSFER_FAILURES.inc()
            entry.failed = str(exc)
        self.inbox.landed.append(request_id)
        self.wake.set()

    async def _admit(self, request_id: str) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return
        request = entry.handoff.request
        bound = log.bind(request_id=request_id)
        if entry.aborted or entry.kv is None:
            self.engine.blocks.free(request_id)
            if entry.kv is None and not entry.aborted:
                bound.warning("kv transfer failed", error=entry.failed)
                event = TokenEvent(request_id, [], finish_reason="error", error=f"KV transfer failed: {entry.failed}")
                await publish_events(self.bus, self.subjects, {request.token_subject: [event]})
            return
        slots = self.engine.blocks.slots(request_id, 0, entry.handoff.num_kv_tokens)
        scatter_kv(self.engine.pool, torch.tensor(slots, dtype=torch.int64, device=self.engine.device), entry.kv)
        self.engine.add_running(
            request_id,
            request.prompt_token_ids,
            entry.handoff.first_token_id,
            from_wire(request.sampling),
            earlier=request.output_token_ids,
        )
        self.token_subjects[request_id] = request.token_subject
        await self.bus.publish(self.subjects.admitted, Admitted(request_id, self.settings.instance_id))
        bound.info("admitted", kv_tokens=entry.handoff.num_kv_tokens)

    async def _admit_offloaded(self, h: KVHandoff) -> None:
        """An offloaded request joins the batch: its executor holds its KV (it sends the hand-off
        only once the KV has landed there), so there is nothing to wait for."""
        request = h.request
        rid = request.request_id
        known = self.engine.executors.get(h.executor_id)
        if isinstance(known, RemoteExecutor) and (known.failed or known.address != h.executor_address):
            # It failed, or restarted under the same id (a new UCX worker): what it held is gone.
            await self._drop_executor(h.executor_id, "the executor restarted" if not known.failed else known.reason)
        if h.executor_id not in self.engine.executors:
            self.executor_slots += 1
            self.engine.executors[h.executor_id] = RemoteExecutor(
                h.executor_id,
                h.executor_address,
                slot=self.executor_slots % MAX_EXECUTORS,
                decode_id=self.settings.instance_id,
                spec=self.engine.spec,
                bus=self.bus,
                channel=self.step_channel,
                subjects=self.subjects,
                loop=asyncio.get_running_loop(),
                timeout=self.settings.transfer_timeout_s,
            )
        self.engine.add_running(
            rid,
            request.prompt_token_ids,
            h.first_token_id,
            from_wire(request.sampling),
            h.executor_id,
            request.output_token_ids,
        )
        self.token_subjects[rid] = request.token_subject
        log.info("admitted offloaded", request_id=rid, executor_id=h.executor_id)

    async def _step(self) -> list[StepOutput]:
        """One engine step; a failed executor ends its requests with an error, the others go on."""
        running = self.engine.running
        if running:
            offloaded = sum(r.executor is not None for r in running)
            metrics.OFFLOADED_SHARE.set(offloaded / len(running))
        try:
            outputs = await step(self.engine, self.step_thread)
        except ExecutorFailed as exc:
            await self._drop_executor(exc.executor_id, str(exc))
            return []
        self._observe_split(len(outputs))
        for request_id in self.engine.taken_back:
            await self._resume_elsewhere(request_id)
        return outputs

    async def _resume_elsewhere(self, request_id: str) -> None:
        """A request its executor handed back (full) holds no KV anywhere: hand it, with the tokens
        it has generated, back to the scheduler to be recomputed on a prefill instance and placed
        again (module docstring)."""
        request = self.engine.withdraw(request_id)
        subject = self.token_subjects.pop(request_id, None)
        if subject is None:  # ended meanwhile (an abort on its way): nothing to resume
            return
        resumed = SubmitRequest(
            request_id, request.prompt_token_ids, to_wire(request.params), subject, request.output_token_ids
        )
        metrics.RESUMED.inc()
        log.info("handed back by its executor: resumed elsewhere", request_id=request_id, tokens=request.num_tokens)
        await self.bus.publish(self.subjects.resume, resumed)

    async def _drop_executor(self, executor_id: str, error: str) -> None:
        """End the requests whose KV lived on a failed executor and forget its client."""
        lost = self.engine.drop_executor(executor_id)
        log.warning("executor failed", executor_id=executor_id, error=error, requests=len(lost))
        events: dict[str, list[TokenEvent]] = {}
        for request in lost:
            subject = self.token_subjects.pop(request.request_id, None)
            if subject is not None:
                events.setdefault(subject, []).append(
                    TokenEvent(request.request_id, [], finish_reason="error", error=error)
                )
        await publish_events(self.bus, self.subjects, events)

    def _observe_split(self, rows: int) -> None:
        """Account a step's `rows` as local or offloaded, and how much remote time it left exposed
        (a recompute step counts as local: its attention ran here)."""
        split = self.engine.last_split
        if split is None:
            metrics.DECODE_ROWS.labels("local").inc(rows)
            return
        offloaded = sum(len(group.rows) for group in split.remote)
        metrics.DECODE_ROWS.labels("offloaded").inc(offloaded)
        metrics.DECODE_ROWS.labels("local").inc(len(split.local_rows))
        metrics.LOCAL_ATTENTION_SECONDS.observe(split.local_s / self.engine.spec.num_layers)
        metrics.OFFLOAD_STALL_SECONDS.observe(split.stall_s)
        previous = self.current_stall()  # a stale mean restarts from this step
        self.offload_stall_s = split.stall_s if previous is None else 0.8 * previous + 0.2 * split.stall_s
        self.stall_measured_at = time.monotonic()

    async def _publish(self, outputs: list[StepOutput]) -> None:
        events: dict[str, list[TokenEvent]] = {}
        for out in outputs:
            subject = self.token_subjects.get(out.request_id)
            if subject is None:
                continue
            finished = out.finish_reason is not None
            events.setdefault(subject, []).append(token_event(out))
            if finished:
                del self.token_subjects[out.request_id]
        await publish_events(self.bus, self.subjects, events)

    async def serve(self, stop: asyncio.Event) -> None:
        subs = [
            await self.bus.subscribe(
                self.subjects.instance(self.settings.instance_id, "handoff"), KVHandoff, self.on_handoff
            ),
            await self.bus.subscribe(self.subjects.abort, AbortRequest, self.on_abort),
            await self.bus.subscribe(self.subjects.load_of("executor"), InstanceLoad, self.on_load),
        ]
        watch = asyncio.create_task(self.watch_executors())
        self.step_model = await asyncio.to_thread(profile_engine, self.engine)
        self.attention_model = await asyncio.to_thread(profile_decode_attention, self.engine)
        log.info("profiled", step=self.step_model.to_wire(), attention=self.attention_model.to_wire())
        beat = asyncio.create_task(heartbeat(self.bus, self.subjects, self.load, self.settings.heartbeat_s))
        log.info("decode instance ready", instance_id=self.settings.instance_id)
        try:
            while not stop.is_set():
                await self._apply_inbox()
                if not self.engine.has_unfinished():
                    if self.inbox.handoffs:  # held for room: look again soon
                        await asyncio.sleep(0.01)
                    else:
                        await wait_for_work(self.wake, stop)
                    continue
                outputs = await self._step()
                if not outputs and not self.engine.running:  # all preempted, for blocks arriving KV holds
                    await asyncio.sleep(0.01)
                await self._publish(outputs)
                await self.keepalive.tick(waiting_at(self.engine), self.token_subjects.get)
        finally:
            beat.cancel()
            watch.cancel()
            for sub in subs:
                await sub.unsubscribe()
            for receive in self.receives:
                receive.cancel()
            self.step_thread.shutdown(wait=False, cancel_futures=True)

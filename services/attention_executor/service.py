"""The attention executor: offloaded requests' KV and their decode attention, beside a prefill instance.

It runs no model layers, only paged decode attention over its own pool (`common.offload.
ExecutorCore`). Prompt KV arrives from the colocated prefill instance exactly as a decode
instance receives it (`KVHandoff`, then one UCX tensor). Per decode step, a decode instance
announces its requests here (`StepBegin`, over UCX: `common.announce`) and then, per layer, sends
one packed q/k/v tensor and receives the attention output under the same tag. Steps from one
decode instance are served in order (each appends a token's slot to its requests); steps from
different decode instances interleave freely.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import structlog
import torch

from common import announce, metrics
from common.bus import Bus, Reply, ServiceUnavailable
from common.errors import NoFreeBlocksError
from common.kv_transfer import kv_shape
from common.messages import (
    AbortRequest,
    Ack,
    Admitted,
    InstanceLoad,
    KVHandoff,
    MessageError,
    ReleaseKV,
    StepBegin,
)
from common.model.spec import ModelSpec
from common.offload import ExecutorCore
from common.profiling import profile_executor
from common.step_model import Slowdown, StepModel
from common.tags import ANNOUNCE_MASK, ANNOUNCE_TAG
from common.tensor_channel import TensorChannel, TransferError
from kernels.backend import DecodeMetadata
from services.runtime import InstanceSettings, Tombstones, heartbeat

log = structlog.get_logger("attention_executor")


class ExecutorService:
    def __init__(
        self,
        settings: InstanceSettings,
        spec: ModelSpec,
        core: ExecutorCore,
        bus: Bus,
        channel: TensorChannel,
    ) -> None:
        self.settings = settings
        self.attention_model: StepModel | None = None  # profiled at start-up: the scheduler's bandwidth bound
        self.slowdown = Slowdown()  # real steps against that profile, while the colocated prefill runs
        self.subjects = settings.subjects
        self.spec = spec
        self.core = core
        self.bus = bus
        self.channel = channel
        self.pending: dict[str, int] = {}  # request -> blocks promised while its KV is in flight
        self.aborted = Tombstones()  # also covers aborts that arrive while a request's KV is in flight
        self.current_steps: dict[str, asyncio.Task[None]] = {}  # per decode instance
        self.tasks: set[asyncio.Task[None]] = set()

    def load(self) -> InstanceLoad:
        """The heartbeat. Hand-offs in flight are not taken off its free blocks: the scheduler
        already counts each routed request until this instance shows it admitted, and counting it
        here too would hide that room twice."""
        blocks = self.core.blocks
        free = blocks.num_free_blocks - self.core.reserved_blocks
        model = None
        if self.attention_model is not None:  # the bandwidth this executor gives now, not when idle
            now = time.monotonic()
            metrics.EXECUTOR_SLOWDOWN.set(self.slowdown.factor(now))
            model = self.slowdown.scaled(self.attention_model, now)
        return InstanceLoad(
            instance_id=self.settings.instance_id,
            role="executor",
            ucx_address=self.channel.address,
            block_size=blocks.block_size,
            total_blocks=blocks.num_blocks,
            free_blocks=max(0, free),
            running=len(self.core.max_tokens),  # held requests (evicted ones leave at once)
            waiting=len(self.pending),
            colocated_with=self.settings.colocated_with,
            attention_model=model.to_wire() if model else [],
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- admission -------------------------------------------------------------------------
    async def on_handoff(self, handoff: KVHandoff, reply: Reply | None) -> None:
        request = handoff.request
        rid = request.request_id
        # the prompt's blocks and one to grow by (the watermark `ExecutorCore.can_admit` keeps)
        need = self.core.blocks.blocks_for(handoff.num_kv_tokens) + 1
        free = self.core.blocks.num_free_blocks - self.core.reserved_blocks - sum(self.pending.values())
        if not handoff.decode_id:
            ack = Ack(False, "a hand-off to an executor must name the decode instance to hand the request to")
        elif rid in self.pending or rid in self.core.max_tokens:
            ack = Ack(False, f"{rid!r} is already here")
        elif rid in self.aborted:
            ack = Ack(False, f"{rid!r} was aborted")
        elif need > free:
            ack = Ack(False, str(NoFreeBlocksError(need, free)))
        else:
            ack = Ack(True)
            self.pending[rid] = need
            self._spawn(self._receive(handoff))
        if reply:
            await reply(ack)

    async def _receive(self, handoff: KVHandoff) -> None:
        request = handoff.request
        rid = request.request_id
        layout, device = self.core.layout, self.core.device  # UCX lands it on the executor's device
        kv = torch.empty(kv_shape(layout, handoff.num_kv_tokens), dtype=layout.dtype, device=device)
        start = time.perf_counter()
        try:
            received = await self.channel.recv_into(handoff.tag, [kv], timeout=self.settings.transfer_timeout_s)
            metrics.TRANSFER_BYTES.labels("recv").inc(received)
            metrics.TRANSFER_SECONDS.labels("recv").observe(time.perf_counter() - start)
        except TransferError as exc:
            metrics.TRANSFER_FAILURES.inc()
            self.pending.pop(rid, None)
            # The scheduler tells the gateway (an executor may not publish tokens: common/nats_auth.py).
            await self.bus.publish(self.subjects.abort, AbortRequest(rid, f"KV transfer to executor failed: {exc}"))
            return
        self.pending.pop(rid, None)
        if rid in self.aborted:  # deferred abort: the transfer is over, nothing was allocated
            return
        self.core.admit(rid, kv, len(request.prompt_token_ids) + request.sampling.max_new_tokens)
        await self.bus.publish(self.subjects.admitted, Admitted(rid, self.settings.instance_id))
        log.info("admitted", request_id=rid, kv_tokens=handoff.num_kv_tokens)
        await self._hand_to_decode(handoff)

    async def _hand_to_decode(self, handoff: KVHandoff) -> None:
        """The one message that puts an offloaded request in its decode instance's batch, sent once
        its KV is here. Refused (aborted meanwhile, or the decode instance gone): the KV is freed
        and the request aborted everywhere; queued there to recompute (no room for a while): the
        KV is freed, the request goes on there."""
        rid = handoff.request.request_id
        message = KVHandoff(
            handoff.request,
            handoff.first_token_id,
            handoff.num_kv_tokens,
            0,
            handoff.prefill_address,
            executor_id=self.settings.instance_id,
            executor_address=self.channel.address,
        )
        subject = self.subjects.instance(handoff.decode_id, "handoff")
        try:
            ack = await self.bus.request(subject, message, Ack, timeout=self.settings.transfer_timeout_s)
        except ServiceUnavailable as exc:
            ack = Ack(False, str(exc))
        if ack.accepted and ack.send_kv:
            return
        self.core.release(rid)
        if not ack.accepted:
            log.warning("decode refused the request", request_id=rid, decode_id=handoff.decode_id, error=ack.error)
            await self.bus.publish(self.subjects.abort, AbortRequest(rid, f"decode refused the request: {ack.error}"))

    async def on_release(self, release: ReleaseKV, reply: Reply | None) -> None:
        self.core.release(release.request_id)

    async def on_abort(self, abort: AbortRequest, reply: Reply | None) -> None:
        self.aborted.add(abort.request_id)
        self.core.release(abort.request_id)

    # ---- decode steps ----------------------------------------------------------------------
    async def listen_for_steps(self) -> None:
        """Take every decode step's announcement from UCX, whichever decode instance sends it; a
        frame that is not a valid `StepBegin` is logged and dropped (its sender's step then fails
        at its transfer timeout, as a lost announcement would)."""
        frame = announce.buffer()
        while not self.channel.closed:
            try:
                await self.channel.recv_matching(ANNOUNCE_TAG, ANNOUNCE_MASK, frame)
                begin = announce.unpack(frame)
            except (TransferError, MessageError) as exc:
                log.warning("bad step announcement", error=str(exc))
                continue
            await self.on_step(begin, None)

    async def on_step(self, begin: StepBegin, reply: Reply | None) -> None:
        """A decode instance announces its next step only after it has every output of the previous
        one, so a previous step still waiting here was abandoned (its forward pass failed on another
        executor): cancel it rather than let it hold this decode instance's steps until it times out."""
        previous = self.current_steps.get(begin.decode_id)
        if previous is not None and not previous.done():
            previous.cancel()
        task = asyncio.create_task(self._serve_step(begin, previous))
        self.current_steps[begin.decode_id] = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve_step(self, begin: StepBegin, previous: asyncio.Task[None] | None) -> None:
        """Serve one step's layers. Rows not served get zeros and are marked in the status sent with
        the first layer's answer: requests this executor no longer holds (an abort or release
        overtook the step: the decode instance drops them when it hears the same abort) and
        requests evicted for want of blocks (`ExecutorCore.begin_step`: the decode instance
        recomputes them). Every other row is served, where refusing the step would stall the
        decode instance until its transfer timeout and fail all of them.

        The first two layers' receives are posted before anything else is done here (the previous
        step's end, block tables): the decode instance sends layer 0's q/k/v right behind the
        announcement, and it lands while this step is being set up. Then layer L + 2's receive is
        posted as soon as layer L's attention is done with its buffer (`_Receives`)."""
        receives = _Receives(self.channel, begin, self.spec, self.core.device, self.settings.transfer_timeout_s)
        try:
            await self._serve_posted(begin, previous, receives)
        finally:
            receives.cancel()  # what a failed or refused step leaves (the channel keeps their memory)

    async def _serve_posted(self, begin: StepBegin, previous: asyncio.Task[None] | None, receives: _Receives) -> None:
        if previous is not None:  # steps append slots in order: let the previous one unwind first
            await asyncio.gather(previous, return_exceptions=True)
        n = len(begin.request_ids)
        rows = [i for i, request_id in enumerate(begin.request_ids) if self.core.holds(request_id)]
        if len(rows) < n:
            gone = [r for r in begin.request_ids if not self.core.holds(r)]
            log.info("step names requests no longer held; their rows get zeros", decode_id=begin.decode_id, gone=gone)
        held = [begin.request_ids[i] for i in rows]
        try:
            meta, refused = self.core.begin_step(held, [begin.context_lens[i] for i in rows]) if held else (None, [])
        except ValueError as exc:  # a length out of what was allowed: a broken peer, refuse the step
            log.warning("step refused", decode_id=begin.decode_id, error=str(exc))
            return
        if refused:
            evicted = [held[i] for i in refused]
            metrics.EXECUTOR_EVICTIONS.inc(len(evicted))
            log.info("pool full: requests handed back to decode", decode_id=begin.decode_id, evicted=evicted)
            rows = [r for j, r in enumerate(rows) if j not in set(refused)]
        served = [begin.request_ids[i] for i in rows]
        status = torch.ones(n, dtype=torch.int8)  # 1: not served here (host memory: the decode reads it there)
        status[rows] = 0
        with self.core.stepping(served):
            index = torch.tensor(rows, dtype=torch.int64, device=self.core.device)
            busy = await self._run_layers(begin, meta, index, status, receives)
        if busy is not None and meta is not None and self.attention_model is not None:
            predicted = self.attention_model.time(len(rows), sum(begin.context_lens[i] for i in rows))
            self.slowdown.observe(busy, predicted, time.monotonic())

    async def _run_layers(
        self,
        begin: StepBegin,
        meta: DecodeMetadata | None,
        rows: torch.Tensor,
        status: torch.Tensor,
        receives: _Receives,
    ) -> float | None:
        """Serve the step's layers; the busy seconds (attention, not the waits), None if it failed."""
        spec = self.spec
        n = len(begin.request_ids)
        device = self.core.device  # every buffer of the step where its attention runs
        answer = torch.zeros(n, spec.num_heads * spec.head_dim, dtype=spec.dtype, device=device)
        every_row = len(rows) == n
        layer_bytes = sum(begin.context_lens) * self.core.layout.bytes_per_token // spec.num_layers
        busy = 0.0  # the waits for each layer's q/k/v are the decode instance's time, not ours
        try:
            peer = await self.channel.connect(begin.decode_address)
            for layer in range(spec.num_layers):
                tag = begin.tag_base + layer
                qkv = await receives.take(layer)
                started = time.perf_counter()
                if meta is not None:
                    mine = qkv if every_row else qkv[rows]
                    q, k, v = mine.split([spec.q_size, spec.kv_size, spec.kv_size], dim=1)
                    out = self.core.attend(
                        layer,
                        q.reshape(-1, spec.num_heads, spec.head_dim),
                        k.reshape(-1, spec.num_kv_heads, spec.head_dim),
                        v.reshape(-1, spec.num_kv_heads, spec.head_dim),
                        meta,
                    )
                    if every_row:
                        answer = out.reshape(n, -1).contiguous()
                    else:
                        answer[rows] = out.reshape(len(rows), -1)
                busy += time.perf_counter() - started
                receives.done_with(layer)
                await self.channel.send(peer, tag, [answer, status] if layer == 0 else [answer])
                metrics.EXECUTOR_ATTENTION_BYTES.inc(layer_bytes)
            metrics.EXECUTOR_STEP_SECONDS.observe(busy)
            return busy
        except TransferError as exc:
            log.warning("decode step failed", decode_id=begin.decode_id, error=str(exc))
            return None

    async def profile(self, stop: asyncio.Event, wait_s: float = 60.0) -> None:
        """Profile decode attention once the colocated prefill instance is up: its start-up
        (imports, loading weights) runs on the same cores and would be timed as this executor's
        slowness, halving the bandwidth the scheduler's bound reads."""
        neighbour_up = asyncio.Event()

        async def on_load(load: InstanceLoad, reply: Reply | None) -> None:
            if load.instance_id == self.settings.colocated_with:
                neighbour_up.set()

        if self.settings.colocated_with:
            sub = await self.bus.subscribe(self.subjects.load_of("prefill"), InstanceLoad, on_load)
            waits = {asyncio.create_task(neighbour_up.wait()), asyncio.create_task(stop.wait())}
            await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            await sub.unsubscribe()
            if not neighbour_up.is_set() and not stop.is_set():
                log.warning("colocated prefill instance not seen; profiling anyway", waited_s=wait_s)
        self.attention_model = await asyncio.to_thread(profile_executor, self.core, self.spec.num_heads)
        log.info("profiled", attention=self.attention_model.to_wire())

    async def serve(self, stop: asyncio.Event) -> None:
        me = self.settings.instance_id
        await self.profile(stop)  # before the first heartbeat: a live executor is a profiled one
        subs = [
            await self.bus.subscribe(self.subjects.instance(me, "handoff"), KVHandoff, self.on_handoff),
            await self.bus.subscribe(self.subjects.instance(me, "release"), ReleaseKV, self.on_release),
            await self.bus.subscribe(self.subjects.abort, AbortRequest, self.on_abort),
        ]
        self._spawn(self.listen_for_steps())
        beat = asyncio.create_task(heartbeat(self.bus, self.subjects, self.load, self.settings.heartbeat_s))
        log.info("attention executor ready", instance_id=me, colocated_with=self.settings.colocated_with)
        try:
            await stop.wait()
        finally:
            beat.cancel()
            for sub in subs:
                await sub.unsubscribe()
            for task in self.tasks:
                task.cancel()


class _Receives:
    """One step's q/k/v receives, two layers ahead in two buffers: enough that a layer's data
    always finds its receive posted, without a buffer per layer (80 of them for a large model)."""

    AHEAD = 2

    def __init__(self, channel: TensorChannel, begin: StepBegin, spec: ModelSpec, device: torch.device, timeout: float):
        self.channel, self.begin, self.num_layers, self.timeout = channel, begin, spec.num_layers, timeout
        width = spec.q_size + 2 * spec.kv_size
        n = len(begin.request_ids)
        self.buffers = [torch.empty(n, width, dtype=spec.dtype, device=device) for _ in range(self.AHEAD)]
        self.tasks: dict[int, asyncio.Task[int]] = {}
        for layer in range(min(self.AHEAD, self.num_layers)):
            self._post(layer)

    def _post(self, layer: int) -> None:
        buffer = self.buffers[layer % self.AHEAD]
        receive = self.channel.recv_into(self.begin.tag_base + layer, [buffer], timeout=self.timeout)
        self.tasks[layer] = asyncio.ensure_future(receive)

    async def take(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s q/k/v, once landed (TransferError if it did not)."""
        await self.tasks.pop(layer)
        return self.buffers[layer % self.AHEAD]

    def done_with(self, layer: int) -> None:
        """Layer `layer`'s buffer is free: post the receive of the layer that will use it."""
        if layer + self.AHEAD < self.num_layers:
            self._post(layer + self.AHEAD)

    def cancel(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()

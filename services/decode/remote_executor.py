"""A decode instance's `ExecutorClient` for an attention executor in another process.

The model step runs in a worker thread while the event loop keeps NATS and UCX going, so each
call hands its I/O to the loop. Each hand-over wakes the loop's thread and, on a loaded CPU,
costs tens of microseconds, so a step makes as few as it can: the step's announcement is queued
without waiting for it (NATS keeps one connection's messages in order, and a dead executor
shows in the first layer's transfer), and each layer's receive and send go over in one
coroutine, the receive posted before q/k/v are sent so that the executor's answer always lands
in a posted buffer; `finish` then waits for it, after the local attention has run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any

import structlog
import torch

from common import metrics
from common.bus import Bus
from common.errors import AdrenalineError
from common.messages import ReleaseKV, StepBegin
from common.model.spec import ModelSpec
from common.offload import ExecutorClient
from common.subjects import Subjects
from common.tags import MAX_LAYERS, step_tag_base
from common.tensor_channel import Peer, TensorChannel

log = structlog.get_logger("decode")


class ExecutorFailed(AdrenalineError):
    """A round trip to an attention executor failed or timed out; its requests cannot go on."""

    def __init__(self, executor_id: str, cause: BaseException) -> None:
        super().__init__(f"attention executor {executor_id} failed: {cause}")
        self.executor_id = executor_id


class RemoteExecutor(ExecutorClient):
    def __init__(
        self,
        executor_id: str,
        peer: Peer,
        *,
        slot: int,  # this executor's number on this decode instance, to keep its tags apart
        decode_id: str,
        spec: ModelSpec,
        bus: Bus,
        channel: TensorChannel,
        subjects: Subjects,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
    ) -> None:
        self.executor_id = executor_id
        self.peer = peer
        self.decode_id = decode_id
        self.spec = spec
        self.bus = bus
        self.channel = channel
        self.subjects = subjects
        self.loop = loop
        self.timeout = timeout
        self.slot = slot
        if spec.num_layers > MAX_LAYERS:
            raise AdrenalineError(f"{spec.num_layers} layers: offloading supports at most {MAX_LAYERS}")
        self._step = 0
        self._rows = 0
        self._tag_base = 0
        self._inflight: dict[int, tuple[Future[float], torch.Tensor, float]] = {}
        self._status = torch.zeros(0, dtype=torch.int8)  # the step's rows not served (1), with layer 0's answer
        self._failed = ""  # set (from the event loop) when the executor is known dead
        self._io: set[asyncio.Task[int]] = set()  # this executor's transfers running on the loop

    @property
    def failed(self) -> bool:
        return bool(self._failed)

    @property
    def reason(self) -> str:
        """Why it failed ("" while it has not)."""
        return self._failed

    def fail(self, reason: str) -> None:
        """The executor is gone (its heartbeats stopped); call on the event loop. Cancels the
        transfers in flight, so that a step waiting on it fails now instead of at the transfer
        timeout, and refuses new ones. Cancelling is safe: `TensorChannel.recv_into` receives
        into staging memory, never into the caller's buffer after it gave up."""
        self._failed = reason
        for task in list(self._io):
            task.cancel()

    async def _round_trip(self, send: Coroutine[Any, Any, int], recv: Coroutine[Any, Any, int]) -> float:
        """Post the answer's receive, then send q/k/v; when the answer arrived, read on the event
        loop as the progress pass resolves it. The receive is posted first: started before the
        send, its task posts as soon as the loop runs it."""
        answer = asyncio.ensure_future(self._tracked(recv))
        try:
            await self._tracked(send)
        except BaseException:
            answer.cancel()
            answer.add_done_callback(lambda t: t.cancelled() or t.exception())  # the send's error is the one told
            raise
        await answer
        return time.perf_counter()

    async def _tracked(self, transfer: Coroutine[Any, Any, int]) -> int:
        """Run one transfer on the loop where `fail` can cancel it."""
        if self._failed:
            transfer.close()
            raise ExecutorFailed(self.executor_id, AdrenalineError(self._failed))
        task = asyncio.ensure_future(transfer)
        self._io.add(task)
        try:
            return await task
        finally:
            self._io.discard(task)

    def admit(self, request_id: str, kv: torch.Tensor, max_tokens: int) -> None:
        raise AdrenalineError(
            "moving a running request to a remote executor is not supported; offloaded "
            "requests reach their executor from the prefill instance"
        )

    def begin_step(self, request_ids: Sequence[str], context_lens: Sequence[int]) -> None:
        if self._failed:
            raise ExecutorFailed(self.executor_id, AdrenalineError(self._failed))
        self._step += 1
        self._rows = len(request_ids)
        self._tag_base = step_tag_base(self.decode_id, self.slot, self._step)
        begin = StepBegin(self.decode_id, self.channel.address, list(request_ids), list(context_lens), self._tag_base)
        subject = self.subjects.instance(self.executor_id, "step")
        # queued, not awaited: a publish fails only with the NATS connection, and then the
        # executor never answers layer 0, which fails the step at its transfer timeout
        self._publish_soon(subject, begin)

    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self._rows
        packed = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=1).contiguous()
        with torch.inference_mode(False):  # the event loop's thread writes into it, outside inference mode
            out = torch.empty(n, self.spec.q_size, dtype=q.dtype, device=q.device)  # on the engine's device
            buffers = [out]
            if layer == 0:  # the first answer also says which rows the executor served (host memory: read here)
                self._status = torch.zeros(n, dtype=torch.int8)
                buffers.append(self._status)
        tag = self._tag_base + layer
        started = time.perf_counter()
        recv_io = self.channel.recv_into(tag, buffers, self.timeout)
        send_io = self.channel.send(self.peer, tag, [packed], self.timeout)
        trip = asyncio.run_coroutine_threadsafe(self._round_trip(send_io, recv_io), self.loop)
        self._inflight[layer] = (trip, out, started)

    def finish(self, layer: int) -> torch.Tensor:
        trip, out, started = self._inflight.pop(layer)
        try:
            arrived = trip.result(self.timeout + 1)
        except ExecutorFailed:
            self._inflight.clear()
            raise
        except CancelledError as exc:  # fail(): the executor is gone
            self._inflight.clear()
            raise ExecutorFailed(self.executor_id, AdrenalineError(self._failed or "cancelled")) from exc
        except Exception as exc:  # TransferError, or the loop's future timing out
            self._inflight.clear()
            raise ExecutorFailed(self.executor_id, exc) from exc
        metrics.LAYER_ROUND_TRIP_SECONDS.observe(arrived - started)
        return out.view(self._rows, self.spec.num_heads, self.spec.head_dim)

    def refused(self) -> list[int]:
        return self._status.nonzero().flatten().tolist()

    def release(self, request_id: str) -> None:
        """Fire and forget (callable from the step thread or the loop): a lost release is caught by
        the executor's abort handling when the decode instance dies."""
        self._publish_soon(self.subjects.instance(self.executor_id, "release"), ReleaseKV(request_id))

    def _publish_soon(self, subject: str, message: StepBegin | ReleaseKV) -> None:
        """Queue a publish on the loop from any thread, without waiting; a failure is logged."""

        def publish() -> None:
            task = asyncio.ensure_future(self.bus.publish(subject, message))
            task.add_done_callback(_log_failure)

        self.loop.call_soon_threadsafe(publish)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("publish to an executor failed", error=str(task.exception()))

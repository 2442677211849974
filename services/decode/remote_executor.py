"""A decode instance's `ExecutorClient` for an attention executor in another process.

Every call comes from the decode step thread, which does the per-layer I/O itself on its own UCX
worker (`StepChannel`): per layer the receive for the answer is posted before q/k/v are sent, so
the executor's answer always lands in a posted buffer; `finish` then waits for it, after the
local attention has run, sleeping on the worker's descriptor. The step's announcement
(`StepBegin`) goes the same way, ahead of the first layer's q/k/v (`common.announce`). The event
loop takes no part in a step; it calls `fail` when the executor's heartbeats stop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import torch

from common import announce, metrics
from common.bus import Bus
from common.errors import AdrenalineError
from common.messages import ReleaseKV, StepBegin
from common.model.spec import ModelSpec
from common.offload import ExecutorClient
from common.subjects import Subjects
from common.tags import MAX_LAYERS, announce_tag, step_tag_base
from common.tensor_channel import TransferError
from services.decode.step_channel import StepChannel, Transfer

log = structlog.get_logger("decode")


class ExecutorFailed(AdrenalineError):
    """A round trip to an attention executor failed or timed out; its requests cannot go on."""

    def __init__(self, executor_id: str, cause: BaseException) -> None:
        super().__init__(f"attention executor {executor_id} failed: {cause}")
        self.executor_id = executor_id


@dataclass
class _Layer:
    transfers: list[Transfer]  # the answer's receive first
    out: torch.Tensor
    started: float


class RemoteExecutor(ExecutorClient):
    def __init__(
        self,
        executor_id: str,
        address: bytes,  # the executor's UCX worker address
        *,
        slot: int,  # this executor's number on this decode instance, to keep its tags apart
        decode_id: str,
        spec: ModelSpec,
        bus: Bus,
        channel: StepChannel,  # the step thread's, shared by every executor of this decode instance
        subjects: Subjects,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
    ) -> None:
        self.executor_id = executor_id
        self.address = address
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
        self._inflight: dict[int, _Layer] = {}
        self._announcing: list[Transfer] = []  # the step's announcement, waited for with layer 0
        self._status = torch.zeros(0, dtype=torch.int8)  # the step's rows not served (1), with layer 0's answer
        self._failed = ""  # set (from the event loop) when the executor is known dead

    @property
    def failed(self) -> bool:
        return bool(self._failed)

    @property
    def reason(self) -> str:
        """Why it failed ("" while it has not)."""
        return self._failed

    def fail(self, reason: str) -> None:
        """The executor is gone (its heartbeats stopped); call from any thread. A step waiting on it
        fails within the step channel's slice instead of at the transfer timeout, and no new one starts."""
        self._failed = reason

    def _check(self) -> None:
        if self._failed:
            self._inflight.clear()
            raise ExecutorFailed(self.executor_id, AdrenalineError(self._failed))

    def admit(self, request_id: str, kv: torch.Tensor, max_tokens: int) -> None:
        raise AdrenalineError(
            "moving a running request to a remote executor is not supported; offloaded "
            "requests reach their executor from the prefill instance"
        )

    def begin_step(self, request_ids: Sequence[str], context_lens: Sequence[int]) -> None:
        self._check()
        self._inflight.clear()  # a previous step that failed elsewhere left its layers here
        self._step += 1
        self._rows = len(request_ids)
        self._tag_base = step_tag_base(self.decode_id, self.slot, self._step)
        begin = StepBegin(self.decode_id, self.channel.address, list(request_ids), list(context_lens), self._tag_base)
        try:
            endpoint = self.channel.connect(self.address)
            frame = announce.pack(begin)
            self._announcing = [self.channel.post_send(endpoint, announce_tag(self._tag_base), [frame])]
        except (TransferError, ValueError) as exc:
            raise ExecutorFailed(self.executor_id, exc) from exc

    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check()
        n = self._rows
        packed = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=1).contiguous()
        out = torch.empty(n, self.spec.q_size, dtype=q.dtype, device=q.device)  # on the engine's device
        buffers = [out]
        if layer == 0:  # the first answer also says which rows the executor served (host memory: read here)
            self._status = torch.zeros(n, dtype=torch.int8)
            buffers.append(self._status)
        tag = self._tag_base + layer
        started = time.perf_counter()
        try:
            recv = self.channel.post_recv(tag, buffers)
            send = self.channel.post_send(self.channel.connect(self.address), tag, [packed])
        except TransferError as exc:
            self._inflight.clear()
            raise ExecutorFailed(self.executor_id, exc) from exc
        announcing, self._announcing = self._announcing, []
        self._inflight[layer] = _Layer([recv, send, *announcing], out, started)

    def finish(self, layer: int) -> torch.Tensor:
        pending = self._inflight.pop(layer)
        try:
            self.channel.wait(pending.transfers, self.timeout, lambda: self._failed)
        except TransferError as exc:
            self._inflight.clear()
            raise ExecutorFailed(self.executor_id, exc) from exc
        # seen by this thread, which looks only after its local attention: an answer that came
        # during it reads as that long (the stall metric is the part not hidden)
        metrics.LAYER_ROUND_TRIP_SECONDS.observe(time.perf_counter() - pending.started)
        return pending.out.view(self._rows, self.spec.num_heads, self.spec.head_dim)

    def refused(self) -> list[int]:
        return self._status.nonzero().flatten().tolist()

    def release(self, request_id: str) -> None:
        """Fire and forget (callable from the step thread or the loop): a lost release is caught by
        the executor's abort handling when the decode instance dies."""
        self._publish_soon(self.subjects.instance(self.executor_id, "release"), ReleaseKV(request_id))

    def _publish_soon(self, subject: str, message: ReleaseKV) -> None:
        """Queue a publish on the loop from any thread, without waiting; a failure is logged."""

        def publish() -> None:
            task = asyncio.ensure_future(self.bus.publish(subject, message))
            task.add_done_callback(_log_failure)

        self.loop.call_soon_threadsafe(publish)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("publish to an executor failed", error=str(task.exception()))

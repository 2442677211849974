"""Bulk-tensor dataplane over UCX (ucxx): tagged send/receive between worker-address endpoints.

Control messages (shapes, tags, who sends what) travel over NATS; this module only moves bytes.
Peers learn each other's worker address out of band (`TensorChannel.address`, plain bytes) and
connect with `create_endpoint_from_worker_address`, the only way shared memory works here
(DESIGN.md, "Gotchas"). Tag matching in UCX is per worker, not per endpoint, so a tag must be
unique among everything in flight towards one process (e.g. derived from request id and layer).

Each tensor travels as its own tagged message, in order, with the same tag: packing them would
cost a copy on the sender, and UCX matches one sender's messages with one tag in the order sent.

Requests go straight to the ucxx worker and endpoint (`tag_send`, `tag_recv`) and are awaited by
polling their completion, as ucxx's own `wait_yield` does: the coroutine wrapper `Endpoint.send`
awaits one message at a time, and running several as tasks cost ~40 us more a round trip here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# ucxx reads UCX_* variables when it is imported; without this, every variable UCX does not know
# (ours and ucxx's own defaults) is reported as a warning in each process.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import ucxx
import ucxx.core
from ucxx._lib.arr import Array
from ucxx.types import Tag

from common.errors import AdrenalineError

# Waiting spins with `sleep(0)` (what ucxx's own `wait_yield` does) for this long, which keeps the
# round trip in the tens of microseconds, then sleeps between checks so an idle wait stops burning a core.
_SPIN_S = 0.005
_IDLE_SLEEP_S = 0.0005
# How long closing one endpoint may wait for its peer; a dead peer must not stall shutdown.
_CLOSE_PERIOD_NS = 100_000_000


class TransferError(AdrenalineError):
    """A tensor transfer that cannot complete: closed channel, message larger than its buffer, UCX error."""


class TransferTimeout(TransferError):
    """A transfer tagged `tag` did not complete within `timeout` seconds: the peer died, or never sent/received."""

    def __init__(self, tag: int, timeout: float, detail: str) -> None:
        super().__init__(f"tag {tag:#x}: {detail} within {timeout:g} s")
        self.tag = tag
        self.timeout = timeout


@dataclass(frozen=True, eq=False)
class Peer:
    """A connected remote worker; `endpoint` is the `ucxx` UCXEndpoint made from `address`."""

    address: bytes
    endpoint: Any


# dtypes numpy and `__cuda_array_interface__` both describe; others (bfloat16, float8) travel as same-width ints.
_NATIVE = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32}
_NATIVE |= {torch.float64, torch.complex64, torch.complex128}
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_buffer(tensor: torch.Tensor) -> Any:
    """A zero-copy view ucxx accepts: numpy for CPU memory, the tensor itself (`__cuda_array_interface__`) for
    CUDA. Views are made with as few torch calls as possible: at ~1 us each they show in a 50 us round trip."""
    if not tensor.is_contiguous():
        raise TransferError("tensors must be contiguous: a strided view would send the wrong bytes")
    if tensor.dtype not in _NATIVE:
        width = _SAME_WIDTH.get(tensor.element_size())
        tensor = tensor.view(width) if width is not None else tensor.reshape(-1).view(torch.uint8)
    return tensor if tensor.is_cuda else tensor.numpy()


def _sync_cuda(tensors: Sequence[torch.Tensor]) -> None:
    """UCX reads and writes device memory outside CUDA stream order, so queued kernels must finish first."""
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


class TensorChannel:
    """The process's UCX worker plus cached endpoints; one channel per process (ucxx keeps one context)."""

    def __init__(self, ctx: Any) -> None:
        self._ctx: Any = ctx
        self._peers: dict[bytes, Peer] = {}
        # Requests unfinished at their timeout, with the memory they read or write: UCX holds raw pointers,
        # so that memory must live until they complete (then they are dropped) or the channel closes.
        self._orphans: list[tuple[list[Any], list[Any]]] = []

    @classmethod
    async def create(cls, progress_mode: str | None = None) -> TensorChannel:
        """Create the process's worker. `progress_mode` defaults to $UCXPY_PROGRESS_MODE, else "blocking":
        measured here (DESIGN.md) it has the best tail latency (p99 66 us against 1.5 ms polling, 4 ms thread)."""
        mode = progress_mode or os.environ.get("UCXPY_PROGRESS_MODE", "blocking")
        try:
            # Inside the running loop on purpose: ucxx attaches its progress task to the current event loop.
            ucxx.init(progress_mode=mode)
        except RuntimeError as e:
            raise TransferError(f"UCX is already initialised in this process: close the other channel ({e})") from e
        return cls(ucxx.core._get_ctx())

    @property
    def address(self) -> bytes:
        """This worker's address, to publish to peers (over NATS) so they can `connect` to it."""
        return bytes(self._worker().address)

    def _worker(self) -> Any:
        # Callers keep only the worker in their locals: a traceback kept by our caller must not pin the
        # context, or `close` could not release it (ucxx.reset refuses while anything references it).
        if self._ctx is None:
            raise TransferError("tensor channel is closed")
        return self._ctx.worker

    async def connect(self, peer_address: bytes) -> Peer:
        """Endpoint to a peer's worker, cached per address. Error handling is off: shared memory needs it."""
        peer = self._peers.get(peer_address)
        if peer is None:
            worker = self._worker()
            address = ucxx.get_ucx_address_from_buffer(peer_address)
            endpoint = worker.create_endpoint_from_worker_address(address, False)
            if not self._ctx.progress_mode.startswith("thread"):
                worker.progress()  # start the wire-up now, as ucxx's own create_endpoint does
            peer = self._peers[peer_address] = Peer(peer_address, endpoint)
        return peer

    async def send(self, peer: Peer, tag: int, tensors: Sequence[torch.Tensor], timeout: float | None = None) -> int:
        """Send each tensor as one message tagged `tag`; returns the bytes sent.

        Completes when UCX is done with the tensors: messages from UCX_RNDV_THRESH up (8 KiB, ucxx's
        default) wait for the peer's receive. After a timeout UCX may still read the tensors until the peer receives or
        the channel closes; they are kept alive until then.
        """
        self._worker()
        _sync_cuda(tensors)
        ucx_tag = Tag(tag)
        arrays = [Array(_as_buffer(t)) for t in tensors]
        requests = [peer.endpoint.tag_send(a, ucx_tag) for a in arrays]
        await self._complete(requests, arrays, tag, timeout, "send")
        return sum(t.nbytes for t in tensors)

    async def recv_into(
        self, tag: int, buffers: Sequence[torch.Tensor], timeout: float, peer: Peer | None = None
    ) -> int:
        """Receive one message per buffer, in order, all tagged `tag`; returns the bytes received.

        UCX receives into staging tensors, copied into `buffers` only once every message has arrived.
        Why: ucxx 0.52 cancels a request only when its Python object is freed, and UCX cannot cancel a
        receive already matched (a rendezvous in progress), so after a timeout a write can still come.
        Staging makes that write harmless: the timed-out requests stay posted, holding their staging
        tensors, until they complete or the channel closes, and `buffers` are never touched. A message
        arriving late is thereby drained instead of matching a later receive; never reuse a timed-out tag.
        The price is one copy per transfer (~1 us for 24 KiB) and, while a dead peer's receive stays
        posted, its staging memory. Pre-posting, rather than probing for the message first, saves
        ~35 us a round trip. `peer` only names the sender in errors: UCX matches tags per worker.
        A message larger than its buffer raises TransferError; a shorter one is not detected (ucxx
        does not report received lengths), so shapes must come from the control message.
        """
        worker = self._worker()
        ucx_tag = Tag(tag)
        staging = [torch.empty_like(b, memory_format=torch.contiguous_format) for b in buffers]
        _sync_cuda(staging)
        arrays = [Array(_as_buffer(s)) for s in staging]
        requests = [worker.tag_recv(a, ucx_tag) for a in arrays]
        who = f" from peer {peer.address[:8].hex()}…" if peer is not None else ""
        await self._complete(requests, [*staging, *arrays], tag, timeout, f"receive{who}")
        for buf, stage in zip(buffers, staging, strict=True):
            buf.copy_(stage)
        return sum(b.nbytes for b in buffers)

    async def _complete(
        self, requests: list[Any], memory: list[Any], tag: int, timeout: float | None, what: str
    ) -> None:
        """Wait for all `requests`, spinning with `sleep(0)` like ucxx's `wait_yield` for the first
        milliseconds (keeps round trips in the tens of microseconds) and then sleeping between checks,
        so that a long wait stops burning a core. UCX progress runs on the event loop meanwhile."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = None if timeout is None else start + timeout
        try:
            while not all(r.completed for r in requests):
                now = loop.time()
                if deadline is not None and now >= deadline:
                    done = sum(r.completed for r in requests)
                    raise TransferTimeout(tag, timeout or 0.0, f"{what}: {done} of {len(requests)} messages done")
                pause = 0.0 if now - start < _SPIN_S else _IDLE_SLEEP_S
                await asyncio.sleep(pause if deadline is None else min(pause, deadline - now))
        except BaseException:  # a timeout, or our caller cancelled us
            self._orphans = [o for o in self._orphans if not all(r.completed for r in o[0])]
            self._orphans.append((requests, memory))
            raise
        try:
            for r in requests:
                r.check_error()
        except Exception as e:  # truncated (message larger than the buffer), cancelled, transport error
            raise TransferError(f"tag {tag:#x}: {what} failed: {e}") from e

    async def close(self) -> None:
        """Close endpoints (bounded wait, a dead peer must not stall shutdown), drop orphaned requests
        (freeing a request cancels it in ucxx) and release the process's UCX context."""
        if self._ctx is None:
            return
        for peer in self._peers.values():
            peer.endpoint.close_blocking(period=_CLOSE_PERIOD_NS, max_attempts=1)
        self._peers.clear()
        self._orphans.clear()
        self._ctx = None
        ucxx.reset()

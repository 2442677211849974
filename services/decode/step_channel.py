"""The decode step thread's own UCX worker, for the per-layer round trips to attention executors.

The model step runs in a worker thread while the event loop keeps NATS and the KV hand-offs
going (`common.tensor_channel.TensorChannel`). Routing each layer's q/k/v and answer through the
loop costs two thread hand-overs per layer (the step thread wakes the loop to post, the loop
wakes the step thread with the answer), each tens of microseconds on a loaded CPU, on the path a
decode step waits on. So the step thread owns a second worker, with its own UCX context (a
worker belongs to one thread, and a context shared by workers of several threads would need
UCX's multi-thread mode): it posts, progresses and sleeps on the worker's descriptor itself.
Executors answer to this worker's address, which each step's announcement carries.

Progress follows the rule UCX documents for `ucp_worker_arm`, as the loop's channel does:
progress until `arm()` succeeds, then sleep on the descriptor; here the sleep is a `select`
bounded by the transfer's deadline and by a short slice, so that an executor declared dead by
the event loop (`cancelled`) ends the wait within that slice.

The channel keeps every transfer it posted until it sees it done, whoever else still refers to
it. Two reasons. UCX may still write into a receive's buffer after its waiter gave up (a
rendezvous under way cannot be cancelled), so that buffer must live. And freeing a ucxx request
that is not done cancels it on its worker, which must then happen on this thread: a step that
fails drops its layers' transfers, and the objects holding them (a `RemoteExecutor`, an
exception's traceback) may be freed by the event loop. Were the last reference there, the loop
would cancel requests on a worker that this thread is progressing, without UCX's multi-thread
mode: undefined behaviour.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # as in common.tensor_channel, before ucxx reads it

from ucxx._lib.arr import Array
from ucxx._lib.libucxx import UCXAddress, UCXContext, UCXEndpoint, UCXWorker
from ucxx.types import Tag

from common import metrics
from common.tensor_channel import (
    MAX_ORPHANS,
    MAX_PEERS,
    ORPHAN_TTL_S,
    TransferError,
    TransferTimeout,
    as_buffer,
    progress_burst,
    sync_cuda,
)

log = structlog.get_logger("decode")

_SLICE_S = 0.05  # the longest sleep between looks at `cancelled`
_SWEEP_AT = 64  # transfers kept before the finished ones are forgotten (amortized: see `_keep`)
_CLOSE_PERIOD_NS = 100_000_000


@dataclass(eq=False)
class Transfer:
    """Posted UCX requests, with the memory they read or write (alive until they complete)."""

    tag: int
    what: str
    requests: list[Any]
    memory: list[Any] = field(default_factory=list)
    posted_at: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return all(r.completed for r in self.requests)


class StepChannel:
    """A UCX worker used by one thread only: created there on first use, never touched by another."""

    def __init__(self, net_devices: str = "") -> None:
        self.net_devices = net_devices
        self._worker: Any = None
        self._context: Any = None
        self._fd = -1
        self._owner = 0
        self._peers: dict[bytes, Any] = {}
        # Every transfer posted and not yet seen done, oldest first, with its memory (see the module's
        # doc); one unfinished ORPHAN_TTL_S after it was posted, or the oldest past MAX_ORPHANS, is
        # given up on (ucxx cancels it): its peer is taken for dead.
        self._posted: dict[int, Transfer] = {}
        self._sweep_at = _SWEEP_AT

    def _ready(self) -> Any:
        if self._worker is None:
            config = {"NET_DEVICES": self.net_devices} if self.net_devices else {}
            try:
                self._context = UCXContext(config)
                self._worker = UCXWorker(self._context, enable_delayed_submission=False, enable_python_future=False)
            except Exception as e:
                raise TransferError(f"UCX could not start: {e}") from e
            self._worker.init_blocking_progress_mode()
            self._fd = self._worker.epoll_file_descriptor
            self._owner = threading.get_ident()
        elif threading.get_ident() != self._owner:
            raise RuntimeError("a StepChannel is used by the thread that first used it, and no other")
        return self._worker

    @property
    def address(self) -> bytes:
        """This worker's address: executors send their answers here."""
        return bytes(self._ready().address)

    def connect(self, address: bytes) -> Any:
        endpoint = self._peers.get(address)
        if endpoint is None:
            worker = self._ready()
            try:
                ucx_address = UCXAddress.create_from_buffer(address)
            except (IndexError, ValueError) as exc:
                raise TransferError(f"not a UCX worker address: {exc}") from exc
            endpoint = UCXEndpoint.create_from_worker_address(worker, ucx_address, False)
            if len(self._peers) >= MAX_PEERS:  # oldest first out: a restarted executor has a new address
                oldest = next(iter(self._peers))
                self._peers.pop(oldest).close_blocking(period=_CLOSE_PERIOD_NS, max_attempts=1)
            self._peers[address] = endpoint
        return endpoint

    def post_recv(self, tag: int, buffers: Sequence[torch.Tensor]) -> Transfer:
        """Post one receive per buffer, straight into them: after a failure the transfer is kept as
        an orphan with its buffers, which the caller then drops, so a late write harms nothing."""
        worker = self._ready()
        sync_cuda(buffers)
        arrays = [Array(as_buffer(b)) for b in buffers]
        requests = [worker.tag_recv(a, Tag(tag)) for a in arrays]
        return self._keep(Transfer(tag, "receive", requests, [*buffers, *arrays]))

    def post_send(self, endpoint: Any, tag: int, tensors: Sequence[torch.Tensor]) -> Transfer:
        self._ready()
        sync_cuda(tensors)
        arrays = [Array(as_buffer(t)) for t in tensors]
        requests = [endpoint.tag_send(a, Tag(tag)) for a in arrays]
        return self._keep(Transfer(tag, "send", requests, [*tensors, *arrays]))

    def _keep(self, transfer: Transfer) -> Transfer:
        """Hold `transfer` until seen done. A successful `wait` lets go of its own at once; those
        nobody waited for (a failed step's later layers) go at a sweep, run whenever the kept
        ones have doubled since the last, so that keeping costs O(1) a transfer."""
        self._posted[id(transfer)] = transfer
        if len(self._posted) >= self._sweep_at:
            self._sweep(time.monotonic())
            self._sweep_at = max(_SWEEP_AT, 2 * len(self._posted))
        return transfer

    def wait(self, transfers: Sequence[Transfer], timeout: float, cancelled: Callable[[], str]) -> None:
        """Progress until every transfer is done; sleep on the worker's descriptor meanwhile.

        Raises TransferTimeout after `timeout` seconds, TransferError when `cancelled()` gives a
        reason or a request failed (a message larger than its buffer, a transport error).
        """
        worker = self._ready()
        deadline = time.monotonic() + timeout
        while True:
            progress_burst(worker)
            if all(t.done for t in transfers):
                break
            # Looked at on every pass, not only before a sleep: a worker that never arms (events
            # keep coming, as from a dead peer's transport) must still end the wait.
            reason = cancelled()
            left = deadline - time.monotonic()
            if reason or left <= 0:
                late = next(t for t in transfers if not t.done)
                self._sweep(time.monotonic())  # the unfinished stay kept: UCX may still use their memory
                if reason:
                    raise TransferError(reason)
                raise TransferTimeout(late.tag, timeout, f"{late.what} not done")
            if worker.arm():  # else events arrived since the last pass: progress them first
                select.select([self._fd], [], [], min(left, _SLICE_S))
        for t in transfers:
            self._posted.pop(id(t), None)
        for t in transfers:
            try:
                for r in t.requests:
                    r.check_error()
            except Exception as e:
                raise TransferError(f"tag {t.tag:#x}: {t.what} failed: {e}") from e

    def _sweep(self, now: float) -> None:
        """Forget the transfers seen done; give up on those unfinished ORPHAN_TTL_S after they were
        posted (their peer is taken for dead) and on the oldest past MAX_ORPHANS."""
        pending = [t for t in self._posted.values() if not t.done]
        expired = [t for t in pending if now - t.posted_at >= ORPHAN_TTL_S]
        kept = [t for t in pending if now - t.posted_at < ORPHAN_TTL_S]
        over = max(0, len(kept) - MAX_ORPHANS)
        crowded, kept = kept[:over], kept[over:]
        self._posted = {id(t): t for t in kept}
        for reason, given_up in (("ttl", expired), ("cap", crowded)):
            if given_up:
                metrics.UCX_ORPHANS_EXPIRED.labels(reason).inc(len(given_up))
                log.warning("gave up on unfinished step transfers", reason=reason, count=len(given_up))
            for orphan in given_up:  # ucxx cancels each request as its last reference goes (here: this thread)
                orphan.requests.clear()
                orphan.memory.clear()

    @property
    def orphans(self) -> int:
        """Transfers posted and unfinished that no successful wait took back: a failed step's."""
        self._sweep(time.monotonic())
        return len(self._posted)

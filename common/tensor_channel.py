"""Bulk-tensor dataplane over UCX (ucxx): tagged send/receive between worker-address endpoints.

Control messages (shapes, tags, who sends what) travel over NATS; this module only moves bytes.
Peers learn each other's worker address out of band (`TensorChannel.address`, plain bytes) and
connect with `create_endpoint_from_worker_address`, the only way shared memory works here
(docs/services.md, "UCX progress"). Tag matching in UCX is per worker, not per endpoint, so a tag must be
unique among everything in flight towards one process (e.g. derived from request id and layer).

Each tensor travels as its own tagged message, in order, with the same tag: packing them would
cost a copy on the sender, and UCX matches one sender's messages with one tag in the order sent.

A transfer that times out stays posted (UCX cannot take back a receive it has begun to fill), an
"orphan" holding the memory UCX may still write, until it finishes. A peer that died never
finishes it, so orphans are bounded: one unfinished `orphan_ttl_s` (120 s, twelve times the
default transfer timeout) after its timeout is taken as its peer's death and given up on, and
past `max_orphans` the oldest go first; giving up drops its requests, which ucxx cancels, so a
receive nobody will match stops waiting. Each is logged and counted
(`adrenaline_ucx_orphaned_transfers_expired_total`).

Progress is driven here, not by ucxx's asyncio helpers: ucxx 0.52's "blocking" mode arms the
worker once, after which its epoll descriptor stays readable and the event loop wakes without
pause (an idle process spun a whole core). The rule UCX documents for `ucp_worker_arm` is kept
instead: after posting work, and whenever the descriptor is readable, progress until `arm()`
succeeds; only then does the loop sleep on the descriptor. Waiters are futures that the
progress pass resolves when their requests complete, so nothing polls. Every UCX call happens
on the event loop's thread (the worker is not shared between threads).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

# ucxx reads UCX_* variables when it is imported; without this, every variable UCX does not know
# (ours and ucxx's own defaults) is reported as a warning in each process.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from ucxx._lib.arr import Array
from ucxx._lib.libucxx import UCXAddress, UCXContext, UCXEndpoint, UCXWorker
from ucxx.types import Tag, TagMask

from common import metrics
from common.errors import AdrenalineError

log = structlog.get_logger(__name__)

# How long closing one endpoint may wait for its peer; a dead peer must not stall shutdown.
_CLOSE_PERIOD_NS = 100_000_000
# A progress pass gives up the loop after this many failed `arm()`s, each after one
# `progress_burst`, and comes back on the loop's next turn: a worker whose events never run out
# must not hold the event loop (and with it NATS and the heartbeats) for ever.
_ARM_TRIES = 16
_PROGRESS_BURST = 64


def progress_burst(worker: Any) -> None:
    """Progress `worker` until it has nothing left to do, or _PROGRESS_BURST times: whoever calls
    it then looks at its own bounds (a deadline, a cancellation, the loop's other work) before
    progressing again, so a worker whose events never run out cannot keep it for ever."""
    for _ in range(_PROGRESS_BURST):
        if not worker.progress_once():
            return


MAX_PEERS = 256  # endpoints kept at once; far more than the instances one process talks to
# Timed-out transfers kept posted (see the module's doc): given up on this long after their
# timeout, and past this many the oldest first. A live peer finishes a transfer within seconds.
ORPHAN_TTL_S = 120.0
MAX_ORPHANS = 1024


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
    """A connected remote worker; `endpoint` is the ucxx UCXEndpoint made from `address`."""

    address: bytes
    endpoint: Any


@dataclass(eq=False)
class _Waiter:
    """UCX requests someone awaits; `future` is resolved by the progress pass that sees them done."""

    requests: list[Any]
    future: asyncio.Future[None]
    memory: list[Any] = field(default_factory=list)  # what UCX reads or writes: alive until completion
    tag: int = 0
    what: str = ""  # "send", "receive from peer ...": for the log line when it is given up on
    orphaned_at: float = 0.0  # when its caller stopped waiting (monotonic)


# dtypes numpy and `__cuda_array_interface__` both describe; others (bfloat16, float8) travel as same-width ints.
_NATIVE = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32}
_NATIVE |= {torch.float64, torch.complex64, torch.complex128}
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_buffer(tensor: torch.Tensor) -> Any:
    """A zero-copy view ucxx accepts: numpy for CPU memory, the tensor itself (`__cuda_array_interface__`) for
    CUDA. Views are made with as few torch calls as possible: at ~1 us each they show in a 50 us round trip."""
    if not tensor.is_contiguous():
        raise TransferError("tensors must be contiguous: a strided view would send the wrong bytes")
    if tensor.dtype not in _NATIVE:
        width = _SAME_WIDTH.get(tensor.element_size())
        tensor = tensor.view(width) if width is not None else tensor.reshape(-1).view(torch.uint8)
    return tensor if tensor.is_cuda else tensor.numpy()


def sync_cuda(tensors: Sequence[torch.Tensor]) -> None:
    """UCX reads and writes device memory outside CUDA stream order, so queued kernels must finish first."""
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


class TensorChannel:
    """The process's UCX worker, progressed on one event loop, plus cached endpoints to peers."""

    def __init__(
        self,
        context: Any,
        worker: Any,
        loop: asyncio.AbstractEventLoop,
        spin_us: float = 0.0,
        orphan_ttl_s: float = ORPHAN_TTL_S,
        max_orphans: int = MAX_ORPHANS,
    ) -> None:
        self._context: Any = context
        self._worker_obj: Any = worker
        self._loop = loop
        self._peers: OrderedDict[bytes, Peer] = OrderedDict()  # least recently used first
        self._waiters: list[_Waiter] = []
        self.spin_s = spin_us * 1e-6  # see `_spin`
        # Requests unfinished at their timeout, with the memory they read or write: UCX holds raw pointers,
        # so that memory must live until they complete (then they are dropped), they expire
        # (`expire_orphans`) or the channel closes. Oldest first.
        self._orphans: list[_Waiter] = []
        self.orphan_ttl_s = orphan_ttl_s
        self.max_orphans = max_orphans
        self._expiry: asyncio.TimerHandle | None = None  # the next `expire_orphans`, while orphans exist
        self._again: asyncio.Handle | None = None  # a `_progress` pass queued because the worker would not arm
        worker.init_blocking_progress_mode()
        self._fd: int = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self._progress)
        self._progress()

    @classmethod
    async def create(cls, net_devices: str = "", spin_us: float = 0.0) -> TensorChannel:
        """Create a UCX context and worker progressed by the running event loop.

        `net_devices` limits the network interfaces UCX listens and connects on (UCX_NET_DEVICES,
        e.g. "lo" to keep a one-host cluster off the network); empty leaves UCX's default, all.
        """
        config = {"NET_DEVICES": net_devices} if net_devices else {}
        try:
            context = UCXContext(config)
            worker = UCXWorker(context, enable_delayed_submission=False, enable_python_future=False)
        except Exception as e:
            raise TransferError(f"UCX could not start: {e}") from e
        return cls(context, worker, asyncio.get_running_loop(), spin_us)

    @property
    def address(self) -> bytes:
        """This worker's address, to publish to peers (over NATS) so they can `connect` to it."""
        return bytes(self._worker().address)

    def _worker(self) -> Any:
        if self._worker_obj is None:
            raise TransferError("tensor channel is closed")
        return self._worker_obj

    def _progress(self) -> None:
        """Progress until the worker arms, then resolve the waiters whose requests completed.

        Runs when the epoll descriptor is readable and after every post. `arm()` fails while
        events are pending, so looping until it succeeds leaves none behind: the descriptor then
        becomes readable again only for new events, and an idle process sleeps. A worker that
        will not arm (`_ARM_TRIES`) gets another pass on the loop's next turn instead of holding it.
        """
        worker = self._worker_obj
        if worker is None:
            return
        if self._again is not None:  # this pass does its work: at most one stays queued
            self._again.cancel()
            self._again = None
        for _ in range(_ARM_TRIES):
            progress_burst(worker)
            if worker.arm():
                break
        else:  # events keep coming (as from a dead peer's transport): go on after what else the loop has
            self._again = self._loop.call_soon(self._progress)
        if self._waiters:
            pending = []
            for waiter in self._waiters:
                if waiter.future.done():  # timed out or cancelled: now an orphan
                    continue
                if all(r.completed for r in waiter.requests):
                    waiter.future.set_result(None)
                else:
                    pending.append(waiter)
            self._waiters = pending

    def _spin(self, requests: list[Any]) -> bool:
        """Progress for up to `spin_s` while `requests` are unfinished, then arm; True if they finished.

        An epoll wake-up costs tens of microseconds per protocol hop here (a 24 KiB rendezvous
        round trip crosses several), so spinning halves an isolated round trip; it is off by
        default (`ADRENALINE_UCX_SPIN_US=0`: one progress pass) because on a shared CPU the
        spinning process takes time from the one that owes the answer (docs/benchmarks.md). It
        never runs without a waiter: an idle process sleeps on the descriptor.
        """
        worker = self._worker_obj
        deadline = time.perf_counter() + self.spin_s
        done = False
        while worker is not None:
            worker.progress_once()
            done = all(r.completed for r in requests)
            if done or time.perf_counter() >= deadline:
                break
            os.sched_yield()  # a peer on this core (the one that owes the answer) runs first
        self._progress()
        return done or all(r.completed for r in requests)

    async def connect(self, peer_address: bytes) -> Peer:
        """Endpoint to a peer's worker, cached per address. Error handling is off: shared memory needs it.

        The cache is bounded (`MAX_PEERS`, least recently used first out): every restart of a peer
        brings a new address, and a long-lived process must not keep an endpoint per address it
        ever saw. The one evicted is the peer unused for longest, far older than any transfer in flight.
        """
        peer = self._peers.get(peer_address)
        if peer is None:
            worker = self._worker()
            if not peer_address:
                raise TransferError("no UCX worker address to connect to")
            try:
                address = UCXAddress.create_from_buffer(peer_address)
            except (IndexError, ValueError) as exc:  # ucxx's answer to a truncated address
                raise TransferError(f"not a UCX worker address: {exc}") from exc
            endpoint = UCXEndpoint.create_from_worker_address(worker, address, False)
            self._progress()  # start the wire-up now
            peer = self._peers[peer_address] = Peer(peer_address, endpoint)
            while len(self._peers) > MAX_PEERS:
                oldest = next(iter(self._peers))
                self._peers.pop(oldest).endpoint.close_blocking(period=_CLOSE_PERIOD_NS, max_attempts=1)
        else:
            self._peers.move_to_end(peer_address)
        return peer

    @property
    def closed(self) -> bool:
        return self._worker_obj is None

    @property
    def num_peers(self) -> int:
        return len(self._peers)

    async def send(self, peer: Peer, tag: int, tensors: Sequence[torch.Tensor], timeout: float | None = None) -> int:
        """Send each tensor as one message tagged `tag`; returns the bytes sent.

        Completes when UCX is done with the tensors: messages from UCX_RNDV_THRESH up (8 KiB, ucxx's
        default) wait for the peer's receive. After a timeout UCX may still read the tensors until the peer receives or
        the channel closes; they are kept alive until then.
        """
        self._worker()
        sync_cuda(tensors)
        ucx_tag = Tag(tag)
        arrays = [Array(as_buffer(t)) for t in tensors]
        requests = [peer.endpoint.tag_send(a, ucx_tag) for a in arrays]
        await self._complete(requests, [*tensors, *arrays], tag, timeout, "send")
        return sum(t.nbytes for t in tensors)

    async def recv_matching(self, tag: int, mask: int, buffer: torch.Tensor) -> None:
        """Receive one message whose tag equals `tag` on the bits set in `mask`, straight into `buffer`.

        For a listener that takes whatever comes (an executor's step announcements): it waits
        without a timeout, so nothing can arrive after its caller gave up except on cancellation,
        and then the request and `buffer` are kept as an orphan, as `recv_into`'s staging is.
        A message larger than `buffer` raises TransferError.
        """
        worker = self._worker()
        sync_cuda([buffer])
        array = Array(as_buffer(buffer))
        request = worker.tag_recv(array, Tag(tag), TagMask(mask))
        await self._complete([request], [buffer, array], tag, None, "receive")

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
        sync_cuda(staging)
        arrays = [Array(as_buffer(s)) for s in staging]
        requests = [worker.tag_recv(a, ucx_tag) for a in arrays]
        who = f" from peer {peer.address[:8].hex()}…" if peer is not None else ""
        await self._complete(requests, [*staging, *arrays], tag, timeout, f"receive{who}")
        for buf, stage in zip(buffers, staging, strict=True):
            buf.copy_(stage)
        return sum(b.nbytes for b in buffers)

    async def _complete(
        self, requests: list[Any], memory: list[Any], tag: int, timeout: float | None, what: str
    ) -> None:
        """Wait for all `requests`: progress once (small messages often complete at once), else
        sleep until a progress pass resolves our future, or the timeout."""
        if not self._spin(requests):
            waiter = _Waiter(requests, self._loop.create_future(), memory)
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await waiter.future
            except BaseException as exc:  # a timeout, or our caller cancelled us
                waiter.tag, waiter.what, waiter.orphaned_at = tag, what, time.monotonic()
                self._orphans.append(waiter)
                self.expire_orphans()
                if isinstance(exc, TimeoutError):
                    done = sum(r.completed for r in requests)
                    raise TransferTimeout(
                        tag, timeout or 0.0, f"{what}: {done} of {len(requests)} messages done"
                    ) from None
                raise
        try:
            for r in requests:
                r.check_error()
        except Exception as e:  # truncated (message larger than the buffer), cancelled, transport error
            raise TransferError(f"tag {tag:#x}: {what} failed: {e}") from e

    @property
    def num_orphans(self) -> int:
        """Timed-out transfers still posted, finished ones not yet forgotten included."""
        return len(self._orphans)

    def expire_orphans(self, now: float | None = None) -> int:
        """Forget orphans that finished, give up on those unfinished `orphan_ttl_s` after their
        timeout and on the oldest past `max_orphans`; how many were given up on.

        Giving up drops an orphan's requests, which ucxx cancels when their objects go: a receive
        not yet matched then no longer takes a later message with its tag, and its staging
        memory is freed. UCX cannot cancel a receive it has begun to fill (a rendezvous under
        way); after the TTL its peer is taken as gone, and a dead peer writes nothing more.
        Runs when a transfer is orphaned and, while orphans remain, on a timer, so an idle
        process lets go of them too.
        """
        now = time.monotonic() if now is None else now
        pending = [o for o in self._orphans if not all(r.completed for r in o.requests)]
        expired = [o for o in pending if now - o.orphaned_at >= self.orphan_ttl_s]
        kept = [o for o in pending if now - o.orphaned_at < self.orphan_ttl_s]
        over = max(0, len(kept) - self.max_orphans)
        crowded, kept = kept[:over], kept[over:]
        self._orphans = kept
        for reason, given_up in (("ttl", expired), ("cap", crowded)):
            for orphan in given_up:
                log.warning(
                    "gave up on a timed-out transfer",
                    tag=f"{orphan.tag:#x}",
                    transfer=orphan.what,
                    unfinished_s=round(now - orphan.orphaned_at, 1),
                    reason=reason,
                )
            if given_up:
                metrics.UCX_ORPHANS_EXPIRED.labels(reason).inc(len(given_up))
        for orphan in (*expired, *crowded):  # ucxx cancels each request as its last reference goes
            orphan.requests.clear()
            orphan.memory.clear()
        metrics.UCX_ORPHANS.set(len(self._orphans))
        self._schedule_expiry(now)
        return len(expired) + len(crowded)

    def _schedule_expiry(self, now: float) -> None:
        """A timer for the oldest orphan's expiry (none while there is none)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._orphans and self._worker_obj is not None:
            delay = max(0.0, self._orphans[0].orphaned_at + self.orphan_ttl_s - now)
            self._expiry = self._loop.call_later(delay, self.expire_orphans)

    async def close(self) -> None:
        """Close endpoints (bounded wait, a dead peer must not stall shutdown), drop orphaned requests
        (freeing a request cancels it in ucxx) and release the worker and context."""
        if self._worker_obj is None:
            return
        self._loop.remove_reader(self._fd)
        for peer in self._peers.values():
            peer.endpoint.close_blocking(period=_CLOSE_PERIOD_NS, max_attempts=1)
        self._peers.clear()
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(TransferError("tensor channel closed"))
        self._waiters.clear()
        self._orphans.clear()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._again is not None:
            self._again.cancel()
            self._again = None
        self._worker_obj = None
        self._context = None

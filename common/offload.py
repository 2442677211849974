"""Decode attention for offloaded requests: the executor's side and the decode instance's split.

Adrenaline keeps an offloaded request's KV on an attention executor (beside a prefill
instance) and computes its decode attention there; the decode instance keeps everything else.
This module is the transport-agnostic core of both sides:

* `ExecutorCore`: an executor's pool, block books and paged attention. Per step it appends one
  slot per request and builds the metadata once (`begin_step`), so the per-layer call
  (`attend`) only stores k/v and runs the kernel.
* `ExecutorClient`: how a decode instance reaches one executor, per layer: `start` ships q/k/v
  of that executor's requests, `finish` returns their attention output. `InProcessExecutor`
  calls a core directly; the UCX client of the executor service implements the same two calls,
  so the split below does not change when the executor moves to another process.
* `SplitAttention`: the per-layer attention of a decode batch whose rows are partly local and
  partly on executors: remote work is started first, local attention runs meanwhile, outputs
  are put back in batch order.

    batch rows:   [ r0 r1 r2 r3 r4 r5 ]      local_rows  = [0, 3, 5]
    executor A:        r1    r4              rows of A   = [1, 4]
    executor B:           r2                 rows of B   = [2]
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from common.block_manager import BlockManager
from common.errors import NoFreeBlocksError
from common.kv_pool import KVLayout, KVPool
from common.kv_transfer import scatter_kv
from common.paged_attention import PagedAttention, decode_metadata
from kernels.backend import AttentionBackend, DecodeMetadata


class ExecutorCore:
    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        backend: AttentionBackend,
        scale: float,
        device: torch.device,
        pool: KVPool | None = None,  # default: its own; profiling borrows an idle engine's
    ) -> None:
        self.layout = layout
        self.device = device
        self.blocks = BlockManager(num_blocks, layout.block_size)
        self.pool = pool if pool is not None else KVPool(layout, num_blocks, device)
        self.attention = PagedAttention(backend, self.pool, scale)
        self.max_tokens: dict[str, int] = {}  # per request: the most KV tokens it may ever need
        self._in_step: dict[str, int] = {}  # requests whose blocks a step in flight still writes, and how many steps
        self._release_after_step: set[str] = set()
        self.evictions = 0  # requests handed back to their decode instance for want of blocks

    @property
    def reserved_blocks(self) -> int:
        """Blocks kept free for growth: one per held request, the most one step can take from the
        pool, so that a step finds the executor full only when admissions outran the watermark."""
        return len(self.max_tokens)

    def can_admit(self, num_tokens: int) -> bool:
        """Room for a prompt of `num_tokens` plus the growth watermark (one block per request, this one too)."""
        return self.blocks.blocks_for(num_tokens) + self.reserved_blocks + 1 <= self.blocks.num_free_blocks

    def admit(self, request_id: str, kv: torch.Tensor, max_tokens: int) -> None:
        """Take a request's prompt KV `[num_layers, 2, n, kv_heads, head_dim]`; it may grow to `max_tokens`.

        Only the prompt's blocks are taken: the request grows a block at a time, as on a decode
        instance, and when a step finds the pool empty the newest requests are handed back
        (`begin_step`) rather than reserving every request's maximum length up front, which
        left most of the pool idle.
        """
        num_tokens = kv.shape[2]
        if not self.can_admit(num_tokens):
            free = self.blocks.num_free_blocks - self.reserved_blocks - 1
            raise NoFreeBlocksError(needed=self.blocks.blocks_for(num_tokens), free=free)
        self.blocks.allocate(request_id, num_tokens)
        slots = torch.tensor(self.blocks.slots(request_id, 0, num_tokens), dtype=torch.int64, device=self.device)
        scatter_kv(self.pool, slots, kv.to(self.device))
        self.max_tokens[request_id] = max_tokens

    def begin_step(
        self, request_ids: Sequence[str], context_lens: Sequence[int]
    ) -> tuple[DecodeMetadata | None, list[int]]:
        """One new token per request at position context_lens[i] - 1; take its slot, build metadata once.

        Returns the metadata of the rows served and the rows handed back: when the pool cannot
        give every request its next slot, the most recently admitted requests of the step are
        evicted (their blocks freed) until it can; their decode instance recomputes them from
        their tokens, so nothing is lost. Checked whole before anything changes (KeyError: an
        unknown request; ValueError: a length that shrinks or outgrows its maximum), so a bad
        step takes nothing from the requests that are here.
        """
        for request_id, n in zip(request_ids, context_lens, strict=True):
            held, limit = self.blocks.num_tokens(request_id), self.max_tokens[request_id]
            if not held <= n <= limit:
                raise ValueError(f"{request_id}: context of {n} tokens, holds {held}, may grow to {limit}")
        wants = {r: n for r, n in zip(request_ids, context_lens, strict=True)}
        needed = sum(self.blocks.blocks_for(n) - len(self.blocks.block_table(r)) for r, n in wants.items())
        admitted = {r: i for i, r in enumerate(self.max_tokens)}  # oldest first
        evicted: set[str] = set()
        for victim in sorted(wants, key=admitted.__getitem__, reverse=True):  # newest first
            if needed <= self.blocks.num_free_blocks:
                break
            needed -= self.blocks.blocks_for(wants[victim]) - len(self.blocks.block_table(victim))
            self.release(victim)  # deferred to the end of any step still writing its blocks
            evicted.add(victim)
        served = []
        for i, (request_id, n) in enumerate(zip(request_ids, context_lens, strict=True)):
            if request_id in evicted:
                continue
            if not self.blocks.can_append(request_id, n):  # a victim's blocks wait for another step's end
                self.release(request_id)
                evicted.add(request_id)
                continue
            self.blocks.append(request_id, n)
            served.append(i)
        self.evictions += len(evicted)
        refused = [i for i, request_id in enumerate(request_ids) if request_id in evicted]
        if not served:
            return None, refused
        ids, lens = [request_ids[i] for i in served], [context_lens[i] for i in served]
        return decode_metadata(self.blocks, ids, lens, self.device), refused

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: DecodeMetadata
    ) -> torch.Tensor:
        return self.attention.decode(layer, q, k, v, meta)

    def holds(self, request_id: str) -> bool:
        return request_id in self.max_tokens and request_id not in self._release_after_step

    def release(self, request_id: str) -> None:
        """Free a request's KV; while a step in flight still writes its blocks (its later layers),
        only once that step ends, so that no other request can be given those blocks meanwhile."""
        if request_id in self._in_step:
            if request_id in self.max_tokens:
                self._release_after_step.add(request_id)
            return
        self.blocks.free(request_id)
        self.max_tokens.pop(request_id, None)

    @contextmanager
    def stepping(self, request_ids: Sequence[str]) -> Iterator[None]:
        """Mark a step in flight over `request_ids` (one whose layers arrive over time, between which
        aborts and releases are handled); releases that come meanwhile wait for its end."""
        for request_id in request_ids:
            self._in_step[request_id] = self._in_step.get(request_id, 0) + 1
        try:
            yield
        finally:
            for request_id in request_ids:
                left = self._in_step.pop(request_id) - 1
                if left:
                    self._in_step[request_id] = left
                elif request_id in self._release_after_step:
                    self._release_after_step.discard(request_id)
                    self.release(request_id)


class ExecutorClient(ABC):
    """A decode instance's handle on one executor, for one step at a time."""

    @abstractmethod
    def admit(self, request_id: str, kv: torch.Tensor, max_tokens: int) -> None:
        """Move a request's KV `[num_layers, 2, n, kv_heads, head_dim]` to the executor (raises NoFreeBlocksError)."""

    @abstractmethod
    def begin_step(self, request_ids: Sequence[str], context_lens: Sequence[int]) -> None:
        """Announce the step's requests (in row order) before the first layer."""

    @abstractmethod
    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Ship this layer's q [n, H, D], k and v [n, Hkv, D] of the step's requests."""

    @abstractmethod
    def finish(self, layer: int) -> torch.Tensor:
        """This layer's attention output [n, H, D], in the order of `begin_step`."""

    @abstractmethod
    def refused(self) -> list[int]:
        """After `finish(0)`: the rows (in `begin_step` order) the executor did not serve this step,
        whose outputs are meaningless: it was out of blocks and handed them back (or no longer held them)."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """The request ended: free its KV on the executor."""


class InProcessExecutor(ExecutorClient):
    """An executor core in the decode instance's own process: the reference for fidelity tests."""

    def __init__(self, core: ExecutorCore) -> None:
        self.core = core
        self._meta: DecodeMetadata | None = None
        self._served: list[int] = []
        self._refused: list[int] = []
        self._out: torch.Tensor | None = None

    def admit(self, request_id: str, kv: torch.Tensor, max_tokens: int) -> None:
        self.core.admit(request_id, kv, max_tokens)

    def begin_step(self, request_ids: Sequence[str], context_lens: Sequence[int]) -> None:
        self._meta, self._refused = self.core.begin_step(request_ids, context_lens)
        self._served = [i for i in range(len(request_ids)) if i not in set(self._refused)]

    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self._refused:
            assert self._meta is not None, "start() before begin_step()"
            self._out = self.core.attend(layer, q, k, v, self._meta)
            return
        out = torch.zeros_like(q)
        if self._meta is not None:
            rows = torch.tensor(self._served, device=q.device)
            out[rows] = self.core.attend(layer, q[rows], k[rows], v[rows], self._meta)
        self._out = out

    def refused(self) -> list[int]:
        return self._refused

    def finish(self, layer: int) -> torch.Tensor:
        if self._out is None:
            raise RuntimeError("finish() before start()")
        out, self._out = self._out, None
        return out

    def release(self, request_id: str) -> None:
        self.core.release(request_id)


@dataclass(frozen=True)
class RemoteGroup:
    client: ExecutorClient
    rows: torch.Tensor  # [n], int64: the batch rows this executor serves, in its begin_step order


class SplitAttention:
    """The attention callable of one decode step whose batch is split between local and remote rows."""

    def __init__(
        self,
        local: PagedAttention,
        local_rows: torch.Tensor,  # [n_local], int64
        local_meta: DecodeMetadata | None,
        remote: Sequence[RemoteGroup],
    ) -> None:
        self.local = local
        self.local_rows = local_rows
        self.local_meta = local_meta
        self.remote = remote
        # Summed over the step's layers: what the scheduler's offloading policy and the metrics
        # compare. `stall_s` is remote time that local attention did not hide.
        self.local_s = 0.0
        self.stall_s = 0.0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for group in self.remote:  # ship remote work first, so it overlaps local attention
            group.client.start(layer, q[group.rows], k[group.rows], v[group.rows])
        out = torch.empty_like(q)
        started = time.perf_counter()
        if self.local_meta is not None:
            rows = self.local_rows
            out[rows] = self.local.decode(layer, q[rows], k[rows], v[rows], self.local_meta)
        local_done = time.perf_counter()
        for group in self.remote:
            out[group.rows] = group.client.finish(layer)
        self.local_s += local_done - started
        self.stall_s += time.perf_counter() - local_done
        return out

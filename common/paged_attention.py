"""Attention over the paged KV pool, and the per-batch metadata it needs.

The prefill service, the decode service and the attention executor all run attention through
`PagedAttention`: it stores the new keys and values at their slots, then calls the backend.
Metadata is built once per batch, from the block manager's books, never per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.block_manager import BlockManager, Owner
from common.kv_pool import KVPool
from common.model.model import AttentionFn
from kernels.backend import AttentionBackend, DecodeMetadata, PrefillMetadata


def prefill_metadata(
    blocks: BlockManager, owners: Sequence[Owner], lengths: Sequence[int], device: torch.device
) -> PrefillMetadata:
    """Tokens 0..lengths[i]-1 of owners[i], packed in order; their blocks must be allocated."""
    cu = [0]
    slots: list[int] = []
    for owner, n in zip(owners, lengths, strict=True):
        cu.append(cu[-1] + n)
        slots.extend(blocks.slots(owner, 0, n))
    return PrefillMetadata(
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        max_seqlen=max(lengths),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
    )


def decode_metadata(
    blocks: BlockManager, owners: Sequence[Owner], context_lens: Sequence[int], device: torch.device
) -> DecodeMetadata:
    """One new token per owner at position context_lens[i] - 1; its block must be allocated."""
    tables = [blocks.block_table(o) for o in owners]
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return DecodeMetadata(
        slot_mapping=torch.tensor(
            [blocks.slot(o, n - 1) for o, n in zip(owners, context_lens, strict=True)],
            dtype=torch.int64,
            device=device,
        ),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        context_lens=torch.tensor(list(context_lens), dtype=torch.int32, device=device),
        max_context_len=max(context_lens),
    )


class PagedAttention:
    def __init__(self, backend: AttentionBackend, pool: KVPool, scale: float) -> None:
        self.backend = backend
        self.pool = pool
        self.scale = scale

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PrefillMetadata
    ) -> torch.Tensor:
        self.backend.store_kv(k, v, self.pool.k[layer], self.pool.v[layer], meta.slot_mapping)
        return self.backend.prefill_attention(q, k, v, meta, self.scale)

    def decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: DecodeMetadata
    ) -> torch.Tensor:
        self.backend.store_kv(k, v, self.pool.k[layer], self.pool.v[layer], meta.slot_mapping)
        return self.backend.paged_decode_attention(q, self.pool.k[layer], self.pool.v[layer], meta, self.scale)

    def prefill_fn(self, meta: PrefillMetadata) -> AttentionFn:
        return lambda layer, q, k, v: self.prefill(layer, q, k, v, meta)

    def decode_fn(self, meta: DecodeMetadata) -> AttentionFn:
        return lambda layer, q, k, v: self.decode(layer, q, k, v, meta)

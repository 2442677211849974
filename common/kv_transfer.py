"""Packing a request's KV out of the paged pool and back in, for hand-offs between instances.

The wire layout is one contiguous tensor `[num_layers, 2 (K, V), num_tokens, kv_heads, head_dim]`:
one UCX message per request whatever the model depth, and a layout that does not depend on
either side's block size, so a prefill and a decode instance may page differently.
"""

from __future__ import annotations

import torch

from common.kv_pool import KVLayout, KVPool


def kv_shape(layout: KVLayout, num_tokens: int) -> tuple[int, int, int, int, int]:
    return (layout.num_layers, 2, num_tokens, layout.num_kv_heads, layout.head_dim)


def gather_kv(pool: KVPool, slots: torch.Tensor) -> torch.Tensor:
    """slots [n], int64 -> [num_layers, 2, n, kv_heads, head_dim], contiguous."""
    layout = pool.layout
    out = torch.empty(kv_shape(layout, slots.shape[0]), dtype=layout.dtype, device=pool.k[0].device)
    for layer in range(layout.num_layers):
        out[layer, 0] = pool.k[layer].view(-1, layout.num_kv_heads, layout.head_dim).index_select(0, slots)
        out[layer, 1] = pool.v[layer].view(-1, layout.num_kv_heads, layout.head_dim).index_select(0, slots)
    return out


def scatter_kv(pool: KVPool, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write a `gather_kv` tensor into `slots` of this pool."""
    layout = pool.layout
    if tuple(kv.shape) != kv_shape(layout, slots.shape[0]):
        raise ValueError(f"KV of shape {tuple(kv.shape)} does not fit {slots.shape[0]} slots of {layout}")
    for layer in range(layout.num_layers):
        pool.k[layer].view(-1, layout.num_kv_heads, layout.head_dim).index_copy_(0, slots, kv[layer, 0])
        pool.v[layer].view(-1, layout.num_kv_heads, layout.head_dim).index_copy_(0, slots, kv[layer, 1])

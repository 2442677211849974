"""Vectorized torch kernels: the CPU default and the reference every other backend is tested against."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from kernels.backend import AttentionBackend, DecodeMetadata, PrefillMetadata


class TorchBackend(AttentionBackend):
    name = "torch"

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)

    def prefill_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: PrefillMetadata,
        scale: float,
    ) -> torch.Tensor:
        # A loop over prompts is fine here: prefill is compute-bound and each prompt is one
        # large SDPA call. A block-diagonal mask over the whole batch would cost O(T^2) memory.
        out = torch.empty_like(query)
        bounds = meta.cu_seqlens.tolist()
        for start, end in itertools.pairwise(bounds):
            q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            k = key[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            v = value[start:end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            out[start:end] = o.squeeze(0).transpose(0, 1)
        return out

    def paged_decode_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: DecodeMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_seqs, num_heads, head_dim = query.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        max_blocks = -(-meta.max_context_len // block_size)
        tables = meta.block_tables[:, :max_blocks].long()  # [B, max_blocks]
        span = max_blocks * block_size
        # Gather every sequence's blocks at once: [B, span, Hkv, D]. Padded table entries point
        # at block 0; the mask below hides them and the tail of the last block.
        keys = k_cache[tables].view(num_seqs, span, num_kv_heads, head_dim)
        values = v_cache[tables].view(num_seqs, span, num_kv_heads, head_dim)
        q = query.view(num_seqs, num_kv_heads, group, head_dim)
        scores = torch.einsum("bhgd,blhd->bhgl", q, keys) * scale  # [B, Hkv, G, span]
        positions = torch.arange(span, device=query.device)
        hidden = positions[None, :] >= meta.context_lens[:, None]  # [B, span]
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.einsum("bhgl,blhd->bhgd", probs, values)
        return out.reshape(num_seqs, num_heads, head_dim)

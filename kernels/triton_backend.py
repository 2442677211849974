"""Triton kernels for CUDA: the same three operations as the torch reference.

On a machine without a GPU they run under the Triton interpreter (`TRITON_INTERPRET=1`, set by
the test environment before anything is launched), which is how CI checks them against
`kernels.torch_backend`. Decode attention is one program per (sequence, KV head): the group of
query heads that share a KV head reads each key and value once, which is what a memory-bound
kernel needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import AttentionBackend, DecodeMetadata, PrefillMetadata


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(key_ptr + token * stride_kt + offs, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    scale,
    stride_qs,
    stride_qh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_os,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [G, D]
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, context_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < context_len
        block = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=n_mask, other=0)
        base = block.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, N]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cu_seqlens_ptr,
    out_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - start
    kv_head = head // GROUP
    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = m < seqlen
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + (start + m)[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Rows past the prompt's end are computed and thrown away; causality bounds the loop.
    end = tl.minimum((m_block + 1) * BLOCK_M, seqlen)
    for n_start in range(0, end, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_mask = n < seqlen
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_ptr + (start + n)[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [M, N]
        visible = (m[:, None] >= n[None, :]) & n_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + (start + n)[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (start + m)[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the last two dims as one dense row; a split of a fused QKV output already is."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, block_m: int = 16, block_n: int = 16, decode_block_n: int = 32) -> None:
        self.block_m = block_m
        self.block_n = block_n
        self.decode_block_n = decode_block_n

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        key, value = _rows_contiguous(key), _rows_contiguous(value)
        row = k_cache.shape[2] * k_cache.shape[3]
        _store_kv_kernel[(key.shape[0],)](
            key,
            value,
            k_cache,
            v_cache,
            slot_mapping,
            key.stride(0),
            value.stride(0),
            ROW=row,
            BLOCK=triton.next_power_of_2(row),
        )

    def prefill_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: PrefillMetadata,
        scale: float,
    ) -> torch.Tensor:
        query, key, value = _rows_contiguous(query), _rows_contiguous(key), _rows_contiguous(value)
        num_tokens, num_heads, head_dim = query.shape
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
        num_seqs = meta.cu_seqlens.shape[0] - 1
        grid = (num_seqs, num_heads, triton.cdiv(meta.max_seqlen, self.block_m))
        _prefill_kernel[grid](
            query,
            key,
            value,
            meta.cu_seqlens,
            out,
            scale,
            query.stride(0),
            query.stride(1),
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            out.stride(0),
            out.stride(1),
            GROUP=num_heads // key.shape[1],
            HEAD_DIM=head_dim,
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        )
        return out

    def paged_decode_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: DecodeMetadata,
        scale: float,
    ) -> torch.Tensor:
        query = _rows_contiguous(query)
        num_seqs, num_heads, head_dim = query.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        out = torch.empty_like(query)
        _paged_decode_kernel[(num_seqs, num_kv_heads)](
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            out,
            scale,
            query.stride(0),
            query.stride(1),
            meta.block_tables.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            out.stride(0),
            out.stride(1),
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            BLOCK_G=triton.next_power_of_2(group),
            BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_N=self.decode_block_n,
        )
        return out

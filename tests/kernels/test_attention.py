"""Paged and varlen attention against a dense per-sequence reference, for both backends.

The Triton cases run under the interpreter (TRITON_INTERPRET=1, set by `make test`); they are
skipped only when Triton itself is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import pytest
import torch

from kernels.backend import AttentionBackend, DecodeMetadata, PrefillMetadata, get_backend

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (os.environ.get("TRITON_INTERPRET") != "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [Lq, H, D], k/v [Lk, Hkv, D]: plain softmax(QK^T)V with GQA by repetition, in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(q.shape[2])
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_paged(
    context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, DecodeMetadata, list[torch.Tensor], list[torch.Tensor]]:
    """A pool with each sequence's KV scattered over shuffled blocks, plus the dense copies."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few spare blocks the tables never name
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables: list[list[int]] = []
    for count in blocks_per_seq:
        tables.append(order[:count])
        order = order[count:]
    width = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    dense_k, dense_v = [], []
    for table, n in zip(tables, context_lens, strict=True):
        dense_k.append(k_cache[table].reshape(-1, num_kv_heads, head_dim)[:n])
        dense_v.append(v_cache[table].reshape(-1, num_kv_heads, head_dim)[:n])
    last = [
        t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, context_lens, strict=True)
    ]
    meta = DecodeMetadata(
        slot_mapping=torch.tensor(last, dtype=torch.int64),
        block_tables=block_tables,
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        max_context_len=max(context_lens),
    )
    return k_cache, v_cache, meta, dense_k, dense_v


BACKENDS = [pytest.param("cpu"), pytest.param("torch"), pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2)])
@pytest.mark.parametrize("head_dim", [32, 24])  # the C++ kernel: its AVX-512 key pass (D % 16 == 0), the generic one
def test_paged_decode_matches_dense(
    backend_name: str, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    backend = get_backend(backend_name)
    context_lens = [1, 5, 16, 17, 40, 63]  # partial blocks, exact multiples, a single token
    k_cache, v_cache, meta, dense_k, dense_v = make_paged(
        context_lens, block_size, num_kv_heads, head_dim, seed=block_size
    )
    query = torch.randn(len(context_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(7))
    out = backend.paged_decode_attention(query, k_cache, v_cache, meta, scale=head_dim**-0.5)
    for i in range(len(context_lens)):
        ref = dense_attention(query[i : i + 1], dense_k[i], dense_v[i], causal=False)[0]
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2)])
def test_prefill_varlen_matches_dense(backend_name: str, num_heads: int, num_kv_heads: int) -> None:
    backend = get_backend(backend_name)
    head_dim = 16
    lens = [1, 9, 33, 16]
    gen = torch.Generator().manual_seed(3)
    total = sum(lens)
    q = torch.randn(total, num_heads, head_dim, generator=gen)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = PrefillMetadata(cu_seqlens=cu, max_seqlen=max(lens), slot_mapping=torch.arange(total))
    out = backend.prefill_attention(q, k, v, meta, scale=head_dim**-0.5)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = dense_attention(q[s:e], k[s:e], v[s:e], causal=True)
        torch.testing.assert_close(out[s:e].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_store_kv_writes_exactly_the_named_slots(backend_name: str, block_size: int) -> None:
    backend: AttentionBackend = get_backend(backend_name)
    num_blocks, kv_heads, head_dim = 6, 2, 8
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([num_blocks * block_size - 1, 0, block_size], dtype=torch.int64)
    # A view with a row stride wider than the row, like a slice of a fused QKV output.
    fused = torch.randn(3, 3 * kv_heads * head_dim)
    key = fused[:, : kv_heads * head_dim].view(3, kv_heads, head_dim)
    value = fused[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(3, kv_heads, head_dim)
    backend.store_kv(key, value, k_cache, v_cache, slots)
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    torch.testing.assert_close(flat_k[slots], key)
    torch.testing.assert_close(flat_v[slots], value)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert flat_k[untouched].abs().sum() == 0
    assert flat_v[untouched].abs().sum() == 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_decode_matches_torch_in_half_precision(dtype: torch.dtype) -> None:
    context_lens = [3, 31, 50]
    k_cache, v_cache, meta, _, _ = make_paged(context_lens, 16, 2, 64, seed=11)
    query = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(5))
    args = (query.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta, 0.125)
    ref = get_backend("torch").paged_decode_attention(*args)
    out = get_backend("triton").paged_decode_attention(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


# The AVX-512 value pass holds up to 16 / (head_dim / 16) heads in registers: these fill that set, use
# part of it (12, 4, 32; 6, 2, 16), or leave the pass to the generic loop (16, 2, 64; 8, 2, 128; 24)
SHAPES = [(8, 2, 64), (12, 4, 32), (4, 4, 128), (16, 2, 64), (8, 2, 128), (6, 2, 16), (4, 2, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), SHAPES)
def test_cpu_decode_matches_torch_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """The C++ kernel against the torch reference (the oracle), mixed lengths, every supported dtype."""
    context_lens = [1, 2, 15, 16, 17, 100, 257]
    k_cache, v_cache, meta, _, _ = make_paged(context_lens, 16, num_kv_heads, head_dim, seed=num_heads)
    query = torch.randn(len(context_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(2))
    args = (query.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta, head_dim**-0.5)
    ref = get_backend("torch").paged_decode_attention(*args)
    out = get_backend("cpu").paged_decode_attention(*args)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_cpu_decode_refuses_bad_input_clearly() -> None:
    k_cache, v_cache, meta, _, _ = make_paged([5, 9], 4, 2, 16, seed=0)
    query = torch.randn(2, 4, 16)
    backend = get_backend("cpu")
    too_long = dataclasses.replace(meta, context_lens=torch.tensor([5, 64], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="context length out of range"):
        backend.paged_decode_attention(query, k_cache, v_cache, too_long, 0.25)
    with pytest.raises(RuntimeError, match="share a dtype"):
        backend.paged_decode_attention(query.double(), k_cache, v_cache, meta, 0.25)

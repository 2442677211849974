"""The one interface every attention implementation sits behind.

Three operations cover prefill, decode and the attention executor:

* `store_kv`: write new keys and values into the paged pool at given slots;
* `prefill_attention`: causal attention over a packed, variable-length batch of prompts;
* `paged_decode_attention`: one query token per sequence against its paged KV.

A slot is `block_id * block_size + offset`. The pool of one layer is a pair of tensors
`[num_blocks, block_size, num_kv_heads, head_dim]`; the block manager that decides which
blocks a sequence owns lives in `common.block_manager` and never sees these tensors.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch


@dataclass(frozen=True)
class PrefillMetadata:
    """Where each prompt of a packed prefill batch starts and where its tokens' KV goes."""

    cu_seqlens: torch.Tensor  # [num_seqs + 1], int32: token offsets of each prompt in the batch
    max_seqlen: int  # longest prompt in the batch
    slot_mapping: torch.Tensor  # [num_tokens], int64: cache slot of every token


@dataclass(frozen=True)
class DecodeMetadata:
    """Per-sequence paging state for one decode step (one new token per sequence)."""

    slot_mapping: torch.Tensor  # [num_seqs], int64: cache slot of the new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks], int32: padded with 0 past each table
    context_lens: torch.Tensor  # [num_seqs], int32: tokens to attend to, the new one included
    max_context_len: int  # max(context_lens), known on the host so no device sync is needed


# (x [M, K], weight [N, K], bias [N] or None) -> x @ weight.T + bias, [M, N]
LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class AttentionBackend(ABC):
    """Attention kernels for one device type; stateless, so one instance serves every layer."""

    name: str
    # A faster linear layer than F.linear, where the device has one (`CausalLM.use_linear_kernel`).
    linear: LinearFn | None = None

    @abstractmethod
    def store_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens], int64
    ) -> None:
        """Write `key`/`value` row i into slot `slot_mapping[i]` of the caches, in place."""

    @abstractmethod
    def prefill_attention(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        meta: PrefillMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Causal attention inside each prompt; prompts never see each other."""

    @abstractmethod
    def paged_decode_attention(
        self,
        query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: DecodeMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
        """Attention of each sequence's query over the first `context_lens[i]` cached tokens."""


_BACKENDS = {
    "cpu": ("kernels.cpu_backend", "CpuBackend"),
    "torch": ("kernels.torch_backend", "TorchBackend"),
    "triton": ("kernels.triton_backend", "TritonBackend"),
}


def get_backend(name: str) -> AttentionBackend:
    """Instantiate a backend by name; modules are imported lazily so CPU hosts never load Triton."""
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {sorted(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name]
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    backend: AttentionBackend = backend_cls()
    return backend


def default_backend(device: torch.device) -> AttentionBackend:
    """Triton on CUDA; on CPU the C++ kernels, or the torch reference where they cannot be built
    (no compiler): slower, never wrong, and said so in the log."""
    if device.type == "cuda":
        return get_backend("triton")
    try:
        return get_backend("cpu")
    except Exception as exc:
        structlog.get_logger(__name__).warning("C++ CPU kernels unavailable, using the torch reference", error=str(exc))
        return get_backend("torch")

"""The CPU default: the torch backend with decode attention in C++ (`kernels.cpu`).

Prefill attention (compute-bound, one SDPA call per prompt) and the KV store (one index_copy_)
are already near what the machine can do in torch; paged decode attention is memory-bound and
the torch version reads the KV several times, so that one operation is replaced. The linear
layers go to `kernels.cpu.linear` where the CPU has AVX-512: MKL runs them at ~90 GFLOP/s here,
and at a third of that for a decode step's few rows.
"""

from __future__ import annotations

import torch

from kernels import cpu
from kernels.backend import DecodeMetadata
from kernels.torch_backend import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self) -> None:
        cpu.load()
        if cpu.linear_native():
            self.linear = cpu.linear

    def paged_decode_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: DecodeMetadata,
        scale: float,
    ) -> torch.Tensor:
        return cpu.paged_decode_attention(
            query.contiguous(), k_cache, v_cache, meta.block_tables, meta.context_lens, scale
        )

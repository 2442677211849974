"""The C++ CPU kernels (`paged_attention.cpp`, `linear.cpp`), compiled with the machine's compiler.

`make` builds them once after installing (`python -m kernels.cpu`); at run time `load()` finds
the build in torch's extension cache (`$TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`) and only compiles when the source changed since. torch's loader
hashes the sources and flags and holds a file lock while building, so processes starting
together build once. Flags are tuned for the machine that builds: `-march=native`, so build on
the host (or image) that serves.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

SOURCES = [Path(__file__).resolve().parent / name for name in ("paged_attention.cpp", "linear.cpp")]
NAME = "adrenaline_cpu"
# -ffast-math lets the compiler vectorise the float32 reductions and exp (libmvec); the kernel
# never relies on infinities or NaNs (its running max starts at -FLT_MAX, not -inf).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_lock = threading.Lock()
_loaded = False


def load(verbose: bool = False) -> None:
    """Make `torch.ops.adrenaline_cpu.*` available, compiling first if needed (raises if it cannot)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        from torch.utils import cpp_extension  # imported here: it pulls in setuptools

        os.environ.setdefault("MAX_JOBS", "2")
        cpp_extension.load(
            name=NAME,
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=verbose,
        )
        _loaded = True


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks], int32
    context_lens: torch.Tensor,  # [num_seqs], int32
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    out: torch.Tensor = torch.ops.adrenaline_cpu.paged_decode_attention(
        query, k_cache, v_cache, block_tables, context_lens, scale
    )
    return out


def linear_native() -> bool:
    """Whether `linear` has its own kernel here (AVX-512); elsewhere it is F.linear's."""
    native: bool = torch.ops.adrenaline_cpu.linear_native()
    return native


def linear(
    x: torch.Tensor,  # [M, K] float32, contiguous
    weight: torch.Tensor,  # [N, K] float32, contiguous: nn.Linear's layout
    bias: torch.Tensor | None,  # [N]
) -> torch.Tensor:  # [M, N]
    out: torch.Tensor = torch.ops.adrenaline_cpu.linear(x, weight, bias)
    return out

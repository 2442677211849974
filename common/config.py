"""Engine configuration: one frozen dataclass, validated on construction, naming the bad field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 256 * 2**20  # memory budget of the KV pool (K and V of every layer)
    max_num_seqs: int = 64  # requests in one batch at most
    # Prompt tokens in one prefill batch at most (one long prompt may exceed it alone). 2048, as
    # vLLM's chunked-prefill default: on the 2-core VM, batches of 1-2k tokens ran the in-process
    # engine ~1.1x faster than 8k on every workload of benchmarks/versus_hf (activations that fit
    # the caches), and a prefill instance hands its first requests to decode sooner.
    max_num_batched_tokens: int = 2048
    device: str = "cpu"
    dtype: str | None = None  # None serves the checkpoint's own dtype
    attention_backend: str | None = None  # cpu, torch or triton; None: triton on CUDA, else cpu (C++)

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")


def parse_offload_ratio(value: str | float) -> float | None:
    """`--offload-ratio` / ADRENALINE_OFFLOAD_RATIO: "auto" (None: the scheduler's load-aware
    policy) or a fixed share of requests to offload, in [0, 1] (0 is plain PD disaggregation)."""
    if value == "auto":
        return None
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"offload ratio must be 'auto' or a number in [0, 1], got {value!r}")
    return ratio


def model_name(model: str) -> str:
    """The name a model folder is known by (its last path component): the gateway's default served
    name and the `model_name` label of the vLLM-named metrics."""
    return Path(model).resolve().name or model

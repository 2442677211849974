"""Decode-step time of the engine against the floor this machine sets (a roofline), on one core.

A decode step must read every cached key and value of the batch once (attention, memory-bound)
and run every weight matrix over the batch (the GEMMs: memory-bound at small batches, where
reading the weights dominates, compute-bound at large ones). Nothing can be faster than

    floor = KV bytes / read bandwidth + max(weight bytes / read bandwidth, GEMM flops / GEMM rate)

with the read bandwidth (a sum over 256 MiB on huge pages, as the pools and weights are: a step
only reads its KV and weights, and reading runs ~2x faster than copying here) and the GEMM rate
(a large float32 matmul, the best of MKL's and the backend's own linear kernel) measured here in
the same run. The ratio measured/floor says how far the engine is from that limit (1.0 is the
limit; what is left is Python, small-op and kernel overhead).

    python -m benchmarks.engine [--model DIR] [--backend cpu|torch] [--batch-sizes 1 4 16 32 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import hugepages
from common.block_manager import BlockManager
from common.kv_pool import KVLayout, KVPool
from common.model.loader import load_model
from common.model.model import CausalLM
from common.model.spec import ModelSpec
from common.model.tiny import make_tiny
from common.paged_attention import PagedAttention, decode_metadata
from kernels.backend import LinearFn, get_backend


@dataclass(frozen=True)
class Row:
    batch_size: int
    context_len: int
    step_ms: float  # median decode-step time
    floor_ms: float  # the roofline above, from bandwidth and GEMM rate measured in the same run
    ratio: float  # step_ms / floor_ms
    tokens_per_s: float


def read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second one core reads from memory: a sum over a tensor far larger than the caches,
    on huge pages like the KV pools and weights (common/hugepages.py)."""
    src = hugepages.zeros((nbytes // 4,), torch.float32, torch.device("cpu"))
    src.fill_(1.0)
    src.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - start)
    return nbytes / min(times)


def gemm_rate(linear: LinearFn | None, n: int = 1024, repeats: int = 5) -> float:
    """Float32 flops per second of one large square matmul on this core: the best of MKL's and
    `linear`'s (the backend's kernel beats MKL here, so MKL's alone would be no floor)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    products: list[Callable[[], object]] = [lambda: torch.mm(a, b)]
    if linear is not None:
        products.append(lambda: linear(a, b, None))
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def gemm_params(model: CausalLM) -> int:
    """Weights a decode step multiplies by (every Linear, the LM head too); the embedding is a lookup."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def weight_bytes(model: CausalLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once


def time_decode_step(
    model: CausalLM, attention: PagedAttention, blocks: BlockManager, batch: int, context: int, repeats: int
) -> float:
    owners = list(range(batch))
    for owner in owners:
        blocks.allocate(owner, context)
    try:
        meta = decode_metadata(blocks, owners, [context] * batch, torch.device("cpu"))
        tokens = torch.randint(3, model.spec.vocab_size, (batch,))
        positions = torch.full((batch,), context - 1)
        fn = attention.decode_fn(meta)
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            model.logits(model(tokens, positions, fn))
            if i:  # the first call warms caches and allocators
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        for owner in owners:
            blocks.free(owner)


def run(
    model_dir: Path, batch_sizes: list[int], context_lens: list[int], repeats: int, block_size: int, backend: str
) -> list[Row]:
    spec = ModelSpec.from_folder(model_dir)
    model = load_model(spec)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, spec.dtype)
    num_blocks = max(batch_sizes) * -(-max(context_lens) // block_size)
    pool = KVPool(layout, num_blocks, torch.device("cpu"))
    for cache in pool.k + pool.v:
        cache.normal_()
    kernels = get_backend(backend)
    attention = PagedAttention(kernels, pool, model.scale)
    model.use_linear_kernel(kernels.linear)  # as the engine does: the C++ GEMMs with cpu
    blocks = BlockManager(num_blocks, block_size)
    bandwidth = read_bandwidth()
    flops = gemm_rate(kernels.linear)
    weights = weight_bytes(model)
    params = gemm_params(model)
    rows = []
    grid = [(b, c) for c in context_lens for b in batch_sizes]
    for batch, context in tqdm(grid, desc="decode steps", unit="config", disable=not sys.stderr.isatty()):
        step = time_decode_step(model, attention, blocks, batch, context, repeats)
        gemm = max(weights / bandwidth, 2 * batch * params / flops)
        floor = batch * context * layout.bytes_per_token / bandwidth + gemm
        rows.append(Row(batch, context, step * 1e3, floor * 1e3, step / floor, batch / step))
    print(
        f"model {model_dir}: {weights / 2**20:.1f} MiB of weights, KV {layout.bytes_per_token} B/token, "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s, GEMM {flops / 1e9:.0f} GFLOP/s, "
        f"torch threads {torch.get_num_threads()}, "
        f"decode attention: {backend}"
    )
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| batch | context | step ms | floor ms | ratio | tokens/s |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.batch_size} | {r.context_len} | {r.step_ms:.2f} | {r.floor_ms:.2f} "
            f"| {r.ratio:.1f} | {r.tokens_per_s:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF folder; default: the embedded default model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--context-lens", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument(
        "--backend", default="cpu", help="decode attention: cpu (C++, the default) or torch (reference)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core, as a pinned instance)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_tiny(Path(tmp) / "default", "llama", preset="default")
        rows = run(model_dir, args.batch_sizes, args.context_lens, args.repeats, args.block_size, args.backend)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()

"""Decode-step time of the engine against the floor memory bandwidth sets, on this machine.

A decode step must read every weight once and every cached key and value of the batch once;
nothing can be faster than those bytes divided by the machine's copy bandwidth, measured here
in the same run. The ratio measured/floor says how far the engine is from that limit (1.0 is
the limit; CPU kernels also pay for compute, gathers and Python overhead).

    python -m benchmarks.engine [--model DIR] [--batch-sizes 1 4 16 64] [--context-lens 128 512 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.block_manager import BlockManager
from common.kv_pool import KVLayout, KVPool
from common.model.loader import load_model
from common.model.model import CausalLM
from common.model.spec import ModelSpec
from common.model.tiny import make_tiny
from common.paged_attention import PagedAttention, decode_metadata
from kernels.backend import get_backend


@dataclass(frozen=True)
class Row:
    batch_size: int
    context_len: int
    step_ms: float  # median decode-step time
    floor_ms: float  # (weight bytes + KV bytes) / measured copy bandwidth
    ratio: float  # step_ms / floor_ms
    tokens_per_s: float


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes of payload per second that one tensor copy moves (each byte is read and written)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / min(times)


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


def run(model_dir: Path, batch_sizes: list[int], context_lens: list[int], repeats: int, block_size: int) -> list[Row]:
    spec = ModelSpec.from_folder(model_dir)
    model = load_model(spec)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, spec.dtype)
    num_blocks = max(batch_sizes) * -(-max(context_lens) // block_size)
    pool = KVPool(layout, num_blocks, torch.device("cpu"))
    for cache in pool.k + pool.v:
        cache.normal_()
    attention = PagedAttention(get_backend("torch"), pool, model.scale)
    blocks = BlockManager(num_blocks, block_size)
    bandwidth = copy_bandwidth()
    weights = weight_bytes(model)
    rows = []
    grid = [(b, c) for c in context_lens for b in batch_sizes]
    for batch, context in tqdm(grid, desc="decode steps", unit="config"):
        step = time_decode_step(model, attention, blocks, batch, context, repeats)
        floor = (weights + batch * context * layout.bytes_per_token) / bandwidth
        rows.append(Row(batch, context, step * 1e3, floor * 1e3, step / floor, batch / step))
    print(
        f"model {model_dir}: {weights / 2**20:.1f} MiB of weights, KV {layout.bytes_per_token} B/token, "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, torch threads {torch.get_num_threads()}"
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
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--context-lens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core, as a pinned instance)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_tiny(Path(tmp) / "default", "llama", preset="default")
        rows = run(model_dir, args.batch_sizes, args.context_lens, args.repeats, args.block_size)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()

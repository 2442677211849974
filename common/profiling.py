"""Start-up profiling: a step-time model of a decode instance and of an attention executor.

The load-aware offloading policy (`services.scheduler.policy`) needs to know, before it has
seen any traffic, how long a decode step takes for a given batch and context, and how fast an
executor gets through attention. Each instance measures that once at start-up, on its own
hardware with its own kernels, over a small grid of (batch, context) points, fits

    step seconds = fixed_s + per_seq_s * batch + per_token_s * total context tokens

by least squares, and reports the three numbers in its heartbeats. A decode instance profiles
its whole step (the compute bound's input) and, like an executor, decode attention alone:
there `per_token_s` is the cost of reading one cached token's K and V in every layer, so its
inverse is the instance's attention bandwidth in tokens per second (the bandwidth bound's input).

The KV the profile reads is whatever the pool holds (zeros at start-up): timing does not
depend on the values, and every block it takes is freed before the instance serves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from common.engine import Engine
from common.offload import ExecutorCore
from common.sampling import SamplingParams
from common.step_model import StepModel

RUNS = 24  # timed runs per point at most (each appends a token per request: `grid` leaves room)


def grid(capacity_tokens: int, max_seqs: int, max_len: int, block_size: int) -> list[tuple[int, int]]:
    """(batch, context) points that fit the pool with room for the timed steps, spread enough to
    separate the per-sequence from the per-token cost."""
    short = max(1, min(32, max_len // 4))
    # every request needs its context plus a slot per run, rounded up to whole blocks
    slack = RUNS + 2 * block_size
    big_batch = max(1, min(16, max_seqs, capacity_tokens // (4 * (short + slack))))
    long = max(short + 1, min(512, max_len - RUNS - 8, capacity_tokens // big_batch - slack))
    return [(1, short), (big_batch, short), (1, long), (big_batch, long)]


def _best_time(run: Callable[[], object], budget_s: float) -> float:
    """The fastest of 3 to `RUNS` - 1 runs after a warm-up, as many as fit in `budget_s`.

    The minimum, not the median: instances profile while their neighbours start up on the same
    cores, and a run can only be slowed down by them, never sped up; many short runs make an
    undisturbed one likely.
    """
    run()  # warm-up: first-touch allocations, kernel selection
    best = math.inf
    deadline = time.perf_counter() + budget_s
    for done in range(RUNS - 1):
        if done >= 3 and time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def profile_engine(engine: Engine, budget_s: float = 0.1) -> StepModel:
    """Time decode steps of dummy requests on `engine` (which must be idle) and fit a StepModel."""
    if engine.has_unfinished():
        raise RuntimeError("profile an idle engine: it runs and then aborts its own dummy requests")
    spec = engine.spec
    params = SamplingParams(max_new_tokens=RUNS + 2, temperature=0.0, ignore_eos=True)
    samples = []
    points = grid(engine.capacity_tokens, engine.config.max_num_seqs, spec.max_model_len, engine.blocks.block_size)
    for batch, context in points:
        ids = [f"profile-{batch}x{context}-{i}" for i in range(batch)]
        for rid in ids:
            engine.blocks.allocate(rid, context)
            engine.add_running(rid, [0] * context, 0, params)
        try:
            samples.append((batch, batch * context, _best_time(engine.step, budget_s)))
        finally:
            for rid in ids:
                engine.abort(rid)
    engine.check_integrity()
    return StepModel.fit(samples)


def profile_decode_attention(engine: Engine, budget_s: float = 0.1) -> StepModel:
    """Decode attention alone on `engine`'s device, kernels and (idle) pool, measured exactly as
    an executor measures its own (`profile_executor`), so that the two bandwidths compare like
    for like."""
    if engine.has_unfinished():
        raise RuntimeError("profile an idle engine: its pool is borrowed")
    scratch = ExecutorCore(
        engine.layout,
        engine.blocks.num_blocks,
        engine.attention.backend,
        engine.model.scale,
        engine.device,
        pool=engine.pool,
    )
    return profile_executor(scratch, engine.spec.num_heads, budget_s)


def profile_executor(core: ExecutorCore, num_heads: int, budget_s: float = 0.1) -> StepModel:
    """Time one step of decode attention (every layer) on `core` (which must hold no request)."""
    if core.max_tokens:
        raise RuntimeError("profile an empty executor")
    layout = core.layout
    capacity = core.blocks.num_blocks * layout.block_size
    samples = []
    for batch, context in grid(capacity, 64, 1 << 20, layout.block_size):
        ids = [f"profile-{batch}x{context}-{i}" for i in range(batch)]
        kv = torch.zeros(layout.num_layers, 2, context, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
        for rid in ids:
            core.admit(rid, kv, context + RUNS + 1)
        q = torch.randn(batch, num_heads, layout.head_dim).to(layout.dtype).to(core.device)
        k = torch.randn(batch, layout.num_kv_heads, layout.head_dim).to(layout.dtype).to(core.device)
        lens = [context + 1] * batch

        def one_step(ids: list[str] = ids, lens: list[int] = lens, q: torch.Tensor = q, k: torch.Tensor = k) -> None:
            meta = core.begin_step(ids, lens)
            for layer in range(layout.num_layers):
                core.attend(layer, q, k, k, meta)
            for i in range(len(lens)):
                lens[i] += 1

        try:
            with torch.inference_mode():
                samples.append((batch, batch * context, _best_time(one_step, budget_s)))
        finally:
            for rid in ids:
                core.release(rid)
    return StepModel.fit(samples)

"""Start-up profiling: a step-time model of a decode instance and of an attention executor.

The load-aware offloading policy (`services.scheduler.policy`) needs to know, before it has
seen any traffic, how long a decode step takes for a given batch and context, and how fast an
executor gets through attention. Each instance measures that once at start-up, on its own
hardware with its own kernels, over a fixed grid of (batch, context) points (`grid`), fits

    step seconds = fixed_s + per_seq_s * batch + per_token_s * total context tokens

by least squares, and reports the three numbers in its heartbeats. A decode instance profiles
its whole step (the compute bound's input) and, like an executor, decode attention alone:
there `per_token_s` is the cost of reading one cached token's K and V in every layer, so its
inverse is the instance's attention bandwidth in tokens per second (the bandwidth bound's input).

The grid does not depend on the instance's KV pool: a grid shrunk to fit a small pool loses
its spread (one batch size, contexts close together) and leaves the per-token slope to noise,
which can then come out at or below zero (a model `StepModel.from_wire` rejects). An instance
whose pool cannot hold the grid profiles on scratch memory of its own (a scratch engine sharing
the model's weights, or a scratch executor core), freed before the instance serves. The KV the
profile reads is whatever the pool holds (zeros): timing does not depend on the values, and
every block it takes is freed before the instance serves.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from functools import partial

import torch

from common.engine import Engine
from common.offload import ExecutorCore
from common.sampling import SamplingParams
from common.step_model import StepModel

RUNS = 24  # steps per point at most, warm-up included (each appends a token per request)
# The grid's axes. Two batch sizes far apart and two contexts far apart: the per-sequence and the
# per-token costs then move the step time independently, by margins well above timing noise
# (batch 8 at 512 tokens reads 64 times the KV of batch 1 at 64, at 8 times the per-seq cost).
BATCHES = (1, 8)
CONTEXTS = (64, 512)
ATTEMPTS = 2  # profile again once when a disturbed run leaves the fitted slope unusable


def grid(max_len: int | None = None) -> list[tuple[int, int]]:
    """The (batch, context) points profiled: `BATCHES` x `CONTEXTS`, whatever the KV pool.

    A whole decode step runs real requests, whose context plus the tokens the runs add must stay
    within the model's `max_len`: contexts are clipped to it (the short one to at most half the
    long one, so that two distinct contexts remain). Attention alone has no such limit (None).
    """
    short, long = CONTEXTS
    if max_len is not None:
        longest = max_len - RUNS - 2  # validate(): context + max_new_tokens (RUNS + 2) <= max_len
        if longest < 2:
            raise ValueError(f"a model context of {max_len} tokens leaves no room to profile {RUNS} steps")
        long = min(long, longest)
        short = min(short, long // 2)
    return [(batch, context) for context in (short, long) for batch in BATCHES]


def blocks_needed(points: list[tuple[int, int]], block_size: int) -> int:
    """KV blocks the largest point takes (points run one at a time): every request holds its
    context plus a slot per run, and a spare token (`validate` counts RUNS + 2 new tokens)."""
    return max(batch * -(-(context + RUNS + 2) // block_size) for batch, context in points)


def _release_scratch(device: torch.device) -> None:
    """Give a dropped scratch pool's memory back: on CUDA the caching allocator would keep it
    reserved, out of reach of the pools and activations that serve."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> Callable[[], None]:
    """Wait for the device's queued work: a CUDA kernel launch returns before the kernel ends."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _best_time(run: Callable[[], object], budget_s: float, sync: Callable[[], None]) -> float:
    """The fastest of 3 to `RUNS` - 1 runs after a warm-up, as many as fit in `budget_s`.

    The minimum, not the median: instances profile while their neighbours start up on the same
    cores, and a run can only be slowed down by them, never sped up; many short runs make an
    undisturbed one likely.
    """
    run()  # warm-up: first-touch allocations, kernel selection
    sync()
    best = math.inf
    deadline = time.perf_counter() + budget_s
    for done in range(RUNS - 1):
        if done >= 3 and time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _fit(measure: Callable[[], list[tuple[int, int, float]]]) -> StepModel:
    """Fit `measure`'s samples, measuring again if the first fit is unusable (not `profiled`)."""
    model = StepModel.fit(measure())
    for _ in range(ATTEMPTS - 1):
        if model.profiled:
            break
        model = StepModel.fit(measure())
    return model


def profile_engine(engine: Engine, budget_s: float = 0.1) -> StepModel:
    """Time decode steps of dummy requests on `engine` (which must be idle) and fit a StepModel.

    On the engine's own pool when it holds the grid; otherwise on a scratch engine that shares
    the model's weights and has a pool just big enough, dropped before this returns.
    """
    if engine.has_unfinished():
        raise RuntimeError("profile an idle engine: it runs and then aborts its own dummy requests")
    points = grid(engine.spec.max_model_len)
    blocks = blocks_needed(points, engine.blocks.block_size)
    if engine.blocks.num_blocks >= blocks:
        model = _fit(partial(_measure_engine, engine, points, budget_s))
        engine.check_integrity()
        return model
    config = dataclasses.replace(engine.config, kv_cache_bytes=blocks * engine.layout.bytes_per_block)
    scratch = Engine(engine.model, config)
    try:
        return _fit(partial(_measure_engine, scratch, points, budget_s))
    finally:
        del scratch
        _release_scratch(engine.device)


def _measure_engine(engine: Engine, points: list[tuple[int, int]], budget_s: float) -> list[tuple[int, int, float]]:
    params = SamplingParams(max_new_tokens=RUNS + 2, temperature=0.0, ignore_eos=True)
    samples = []
    sync = _synchronize(engine.device)
    for batch, context in points:
        ids = [f"profile-{batch}x{context}-{i}" for i in range(batch)]
        try:
            for rid in ids:
                engine.blocks.allocate(rid, context)
                engine.add_running(rid, [0] * context, 0, params)
            samples.append((batch, batch * context, _best_time(engine.step, budget_s, sync)))
        finally:
            for rid in ids:
                engine.abort(rid)
                engine.blocks.free(rid)  # idempotent: allocated but never added if add_running raised
    return samples


def profile_decode_attention(engine: Engine, budget_s: float = 0.1) -> StepModel:
    """Decode attention alone on `engine`'s device and kernels, measured exactly as an executor
    measures its own (`profile_executor`, the same grid), so that the two bandwidths compare like
    for like. On the engine's (idle) pool when it holds the grid, else on a scratch pool."""
    if engine.has_unfinished():
        raise RuntimeError("profile an idle engine: its pool is borrowed")
    blocks = blocks_needed(grid(), engine.layout.block_size)
    own = engine.blocks.num_blocks >= blocks
    core = ExecutorCore(
        engine.layout,
        engine.blocks.num_blocks if own else blocks,
        engine.attention.backend,
        engine.model.scale,
        engine.device,
        pool=engine.pool if own else None,
    )
    try:
        return profile_executor(core, engine.spec.num_heads, budget_s)
    finally:
        del core
        if not own:
            _release_scratch(engine.device)


def profile_executor(core: ExecutorCore, num_heads: int, budget_s: float = 0.1) -> StepModel:
    """Time one step of decode attention (every layer) on `core` (which must hold no request).

    On a scratch core with a pool of its own when `core`'s cannot hold the grid.
    """
    if core.max_tokens:
        raise RuntimeError("profile an empty executor")
    points = grid()
    blocks = blocks_needed(points, core.layout.block_size)
    if core.blocks.num_blocks >= blocks:
        return _fit(partial(_measure_attention, core, num_heads, points, budget_s))
    attention = core.attention
    scratch = ExecutorCore(core.layout, blocks, attention.backend, attention.scale, core.device)
    try:
        return _fit(partial(_measure_attention, scratch, num_heads, points, budget_s))
    finally:
        del scratch
        _release_scratch(core.device)


def _measure_attention(
    core: ExecutorCore, num_heads: int, points: list[tuple[int, int]], budget_s: float
) -> list[tuple[int, int, float]]:
    layout = core.layout
    sync = _synchronize(core.device)
    samples = []
    for batch, context in points:
        ids = [f"profile-{batch}x{context}-{i}" for i in range(batch)]
        kv = torch.zeros(layout.num_layers, 2, context, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
        q = torch.randn(batch, num_heads, layout.head_dim).to(layout.dtype).to(core.device)
        k = torch.randn(batch, layout.num_kv_heads, layout.head_dim).to(layout.dtype).to(core.device)
        lens = [context + 1] * batch

        def one_step(ids: list[str] = ids, lens: list[int] = lens, q: torch.Tensor = q, k: torch.Tensor = k) -> None:
            meta, refused = core.begin_step(ids, lens)
            if meta is None or refused:  # the scratch pool is sized for every point's growth
                raise RuntimeError(f"profiling: the scratch pool evicted rows {refused}")
            for layer in range(layout.num_layers):
                core.attend(layer, q, k, k, meta)
            for i in range(len(lens)):
                lens[i] += 1

        try:
            for rid in ids:
                core.admit(rid, kv, context + RUNS + 1)
            with torch.inference_mode():
                samples.append((batch, batch * context, _best_time(one_step, budget_s, sync)))
        finally:
            for rid in ids:
                core.release(rid)
    return samples

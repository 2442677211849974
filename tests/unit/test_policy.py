"""The load-aware offloading policy: the bounds of PAPER.md on hand-computed numbers, every
admission condition refusing on its own, and the start-up profiles it reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from common.config import EngineConfig, parse_offload_ratio
from common.engine import Engine
from common.kv_pool import KVLayout
from common.messages import InstanceLoad
from common.offload import ExecutorCore
from common.profiling import RUNS, grid, profile_decode_attention, profile_engine, profile_executor
from common.step_model import StepModel
from kernels.backend import get_backend
from services.scheduler.policy import Books, Bounds, bounds, decide

SLO = 0.1
# a decode step: 10 ms + 1 ms per request + 10 us per context token (every layer)
DECODE_MODEL = StepModel(0.010, 0.001, 10e-6)


def _decode(**kw: object) -> InstanceLoad:
    base = InstanceLoad(
        "decode-0",
        "decode",
        b"",
        16,
        100,  # 1600 KV tokens
        100,
        0,
        0,
        step_model=DECODE_MODEL.to_wire(),
        attention_model=StepModel(0, 0, DECODE_MODEL.per_token_s).to_wire(),
        max_num_seqs=64,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _executor(blocks: int = 200, per_token_s: float = 20e-6) -> InstanceLoad:
    model = StepModel(0, 0, per_token_s).to_wire()
    return InstanceLoad("executor-0", "executor", b"", 16, blocks, blocks, 0, 0, "prefill-0", attention_model=model)


def test_bounds_follow_the_paper_formulas() -> None:
    d = _decode()
    b = bounds(d, [d], [_executor()], mean_len=100, slo_s=SLO)
    assert b is not None
    assert b.memory_capacity == pytest.approx(3200 / 1600)
    assert b.memory_bandwidth == pytest.approx((1 / 20e-6) / (1 / 10e-6))  # executor half as fast
    # B_tpot = min(64 seats, 1600 / 100 = 16 by KV, (0.1 - 0.01) / (0.001 + 0.001) = 45 by SLO) = 16;
    # B_max = min(64 seats, (0.1 - 0.01) / 0.001 = 90) = 64
    assert b.compute == pytest.approx((64 - 16) / 16)
    assert b.offload == pytest.approx(0.5)
    # two executors double capacity and bandwidth; a second decode halves them
    two = bounds(d, [d], [_executor(), _executor()], 100, SLO)
    shared = bounds(d, [d, _decode(instance_id="decode-1")], [_executor()], 100, SLO)
    assert two is not None and shared is not None
    assert (two.memory_capacity, two.memory_bandwidth) == pytest.approx((4.0, 1.0))
    assert (shared.memory_capacity, shared.memory_bandwidth) == pytest.approx((1.0, 0.25))


def test_compute_bound_is_zero_when_the_slo_binds_before_memory() -> None:
    d = _decode(step_model=StepModel(0.010, 0.003, 10e-6).to_wire())
    b = bounds(d, [d], [_executor()], mean_len=100, slo_s=SLO)
    # B_tpot = (0.1 - 0.01) / (0.003 + 0.001) = 22.5 > 16 by KV, so 16; B_max = 0.09 / 0.003 = 30
    assert b is not None and b.compute == pytest.approx((30 - 16) / 16)
    tight = bounds(d, [d], [_executor()], mean_len=100, slo_s=0.05)
    # B_tpot = 0.04 / 0.004 = 10 (SLO), B_max = 0.04 / 0.003 = 13.3
    assert tight is not None and tight.compute == pytest.approx((0.04 / 0.003 - 10) / 10)


def test_unprofiled_instances_give_no_bound() -> None:
    d = _decode()
    assert bounds(d, [d], [dataclasses.replace(_executor(), attention_model=[])], 100, SLO) is None
    assert bounds(dataclasses.replace(d, step_model=[]), [d], [_executor()], 100, SLO) is None
    assert bounds(d, [d], [], 100, SLO) is None


def _decide(**kw: object) -> tuple[bool, str]:
    args: dict[str, object] = {
        "prompt_tokens": 50,
        "max_tokens": 100,
        "decode": _decode(offload_stall_s=0.02),
        "decode_free_tokens": 50,  # cannot hold 100 more tokens: memory pressure
        "books": Books(local_batch=8, local_tokens=800, offloaded_batch=2, offloaded_tokens=200),
        "executor_free_tokens": 1000,
        "bound": Bounds(1.0, 1.0, 1.0),
        "slo_s": SLO,
    }
    decision = decide(**{**args, **kw})  # type: ignore[arg-type]
    return decision.offload, decision.reason


def test_each_condition_refuses_on_its_own() -> None:
    assert _decide() == (True, "memory_pressure")
    assert _decide(executor_free_tokens=None) == (False, "no_executor")
    assert _decide(bound=None) == (False, "not_profiled")
    assert _decide(executor_free_tokens=99) == (False, "executor_full")
    # C1: offloaded at max length (1550) + 100 > 1.0 * 1600
    assert _decide(books=Books(8, 800, 2, 200, 1550)) == (False, "c1")
    # C2 by tokens (offloaded 760 + 50 > 800) and by batch (8 + 1 > 8)
    assert _decide(books=Books(8, 800, 2, 760)) == (False, "c2")
    assert _decide(books=Books(8, 800, 8, 200)) == (False, "c2")
    assert _decide(books=Books(0, 0, 0, 0)) == (False, "c2")  # nothing local to hide behind
    # SLO: 10 ms + 11 * 1 ms + 800 * 10 us = 29 ms, + 80 ms of measured wait > 100 ms
    assert _decide(decode=_decode(offload_stall_s=0.08)) == (False, "slo")


def test_with_room_locally_offloading_needs_a_hidden_round_trip() -> None:
    room = {"decode_free_tokens": 1000}
    assert _decide(**room) == (False, "not_hidden")  # 20 ms of wait on a 28 ms step
    assert _decide(**room, decode=_decode(offload_stall_s=0.0005)) == (True, "hidden")
    # never measured: one probe at a time
    assert _decide(**room, decode=_decode(), books=Books(8, 800, 0, 0)) == (True, "probe")
    assert _decide(**room, decode=_decode()) == (False, "probe")


def test_offload_ratio_setting() -> None:
    assert parse_offload_ratio("auto") is None
    assert parse_offload_ratio("0") == 0.0 and parse_offload_ratio(0.5) == 0.5
    for bad in ("1.5", "-0.1", "half", "nan"):
        with pytest.raises(ValueError, match="'auto' or a number in"):
            parse_offload_ratio(bad)


def test_step_model_fit_recovers_known_costs() -> None:
    true = StepModel(0.003, 0.0002, 2e-6)
    samples = [(b, b * c, true.time(b, b * c)) for b, c in [(1, 32), (16, 32), (1, 512), (16, 512)]]
    fitted = StepModel.fit(samples)
    for got, want in zip(fitted.to_wire(), true.to_wire(), strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert StepModel.from_wire([]) is None


def test_grid_fits_the_pool() -> None:
    for capacity in (64, 2048, 1 << 20):
        points = grid(capacity, 64, 4096, 16)
        assert len({b for b, _ in points}) == 2 or capacity < 256  # two batch sizes to tell costs apart
        for batch, context in points:  # the runs add up to RUNS tokens per request
            assert batch * -(-(context + RUNS + 1) // 16) * 16 <= capacity


def test_profiles_leave_the_pools_empty(llama_dir: Path) -> None:
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=2**20))
    model = profile_engine(engine, budget_s=0.01)
    assert model.per_token_s > 0 and model.time(8, 800) > model.time(1, 10)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.requests
    spec = engine.spec
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 8, spec.dtype)
    core = ExecutorCore(layout, 256, get_backend("torch"), spec.head_dim**-0.5, torch.device("cpu"))
    executor = profile_executor(core, spec.num_heads, budget_s=0.01)
    assert executor.per_token_s > 0
    assert profile_decode_attention(engine, budget_s=0.01).per_token_s > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert core.blocks.num_free_blocks == 256 and not core.max_tokens and core.reserved_blocks == 0

"""The load-aware offloading policy: the paper's bounds (docs/services.md) on hand-computed numbers, every
admission condition refusing on its own, and the start-up profiles it reads."""

from __future__ import annotations

import dataclasses
import math
import random
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common import profiling
from common.config import EngineConfig, parse_offload_ratio
from common.engine import Engine
from common.kv_pool import KVLayout
from common.messages import InstanceLoad
from common.offload import ExecutorCore
from common.profiling import RUNS, blocks_needed, grid, profile_decode_attention, profile_engine, profile_executor
from common.step_model import Slowdown, StepModel
from kernels.backend import get_backend
from services.scheduler.policy import Books, Bounds, bounds, decide, peak_blocks

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
        "decode": _decode(offload_stall_s=0.002),
        "decode_free_tokens": 50,  # cannot hold 100 more tokens: memory pressure
        "books": Books(local_batch=8, local_tokens=800, offloaded_batch=2, offloaded_tokens=200),
        "executor_free_tokens": 1000,
        "executor_need_tokens": 80,  # the prompt's blocks and one more, not its maximum length
        "bound": Bounds(1.0, 1.0, 1.0),
        "slo_s": SLO,
    }
    decision = decide(**{**args, **kw})  # type: ignore[arg-type]
    return decision.offload, decision.reason


def test_each_condition_refuses_on_its_own() -> None:
    assert _decide() == (True, "memory_pressure")
    assert _decide(executor_free_tokens=None) == (False, "no_executor")
    assert _decide(bound=None) == (False, "not_profiled")
    assert _decide(executor_free_tokens=79) == (False, "executor_full")
    assert _decide(executor_free_tokens=80) == (True, "memory_pressure")  # less than max_tokens (100) is enough
    # C1: the offloaded requests, this one included, within 1.0 * 1600 by the smaller of their
    # coming context (1550 + 75) and the most they hold at once: two of 100 tokens growing to 800
    # hold 1600 together as they end (this one, ending sooner, adds nothing then); growing to 801,
    # 1602. (The local requests' coming context, 1700, is larger: no excess bandwidth, below.)
    fits = Books(8, 800, 2, 200, 1550, 1700, offloaded_spans=[(100, 800)] * 2)
    assert _decide(books=fits) == (True, "memory_pressure")
    assert _decide(books=dataclasses.replace(fits, offloaded_spans=[(100, 801)] * 2)) == (False, "c1")
    # either measure within the bound is enough: a peak of 1800, a coming context of 975
    assert _decide(books=Books(8, 800, 2, 200, 900, 1700, offloaded_spans=[(100, 900)] * 2)) == (
        True,
        "memory_pressure",
    )
    # C2, with room locally (it does not apply under memory pressure, below): by tokens
    # (offloaded 760 + 50 > 800) and by batch (8 + 1 > 8)
    room = {"decode_free_tokens": 1000}
    assert _decide(**room, books=Books(8, 800, 2, 760)) == (False, "c2")
    assert _decide(**room, books=Books(8, 800, 8, 200)) == (False, "c2")
    assert _decide(**room, books=Books(0, 0, 0, 0)) == (False, "c2")  # nothing local to hide behind
    # SLO: 10 ms + 11 * 1 ms + 800 * 10 us = 29 ms, + 80 ms of measured wait > 100 ms
    assert _decide(decode=_decode(offload_stall_s=0.08)) == (False, "slo")


def test_memory_pressure_offloads_whatever_the_local_batch() -> None:
    """C2 keeps a request local only to hide remote attention under local attention. When the
    decode instance cannot hold the request (one long local request fills it, or its local batch
    is momentarily empty), keeping it local means waiting for room: C2 used to refuse every such
    request, leaving the executor idle. C1 and the SLO still refuse on their own."""
    never_measured = _decode()  # no executor wait measured yet: offload_stall_s is None
    # one local request of 310 tokens; 64 tokens free, the new request may grow to 100
    one_long = {"decode": never_measured, "books": Books(1, 310, 0, 0), "decode_free_tokens": 64}
    assert _decide(**one_long) == (True, "memory_pressure_unmeasured")
    # C2 by batch (0 + 1 > 0.5 * 1) had refused it, as it still does with room locally
    assert _decide(**one_long, bound=Bounds(1.0, 1.0, 0.5)) == (True, "memory_pressure_unmeasured")
    assert _decide(**{**one_long, "decode_free_tokens": 1000}, bound=Bounds(1.0, 1.0, 0.5)) == (False, "c2")
    # nothing local at all (by tokens and by batch), still no room for its 100 tokens
    assert _decide(books=Books(0, 0, 0, 0)) == (True, "memory_pressure")
    assert _decide(books=Books(0, 0, 3, 300)) == (True, "memory_pressure")
    # C1: 0.5 * 1600 = 800 tokens for the offloaded requests: their coming context is 750 + 75, and
    # five of 60 growing to 160 hold 800 at once as they end; growing to 161, 805
    fits = {**one_long, "books": Books(1, 310, 5, 300, 750, offloaded_spans=[(60, 160)] * 5)}
    assert _decide(**fits, bound=Bounds(1.0, 1.0, 0.5)) == (True, "memory_pressure_unmeasured")
    full = {**one_long, "books": Books(1, 310, 5, 300, 750, offloaded_spans=[(60, 161)] * 5)}
    assert _decide(**full, bound=Bounds(1.0, 1.0, 0.5)) == (False, "c1")
    # SLO, from the injected step model: 10 ms + 2 * 1 ms + 310 * 10 us = 15.1 ms, + 90 ms of wait > 100 ms
    assert _decide(**{**one_long, "decode": _decode(offload_stall_s=0.09)}) == (False, "slo")
    slow = _decode(step_model=StepModel(0.090, 0.001, 40e-6).to_wire())  # 90 + 2 + 12.4 ms > 100 ms
    assert _decide(**{**one_long, "decode": slow}) == (False, "slo")


def test_under_memory_pressure_offloading_needs_a_higher_output_rate() -> None:
    """The batch an offload buys must pay for the wait every step then shows. The injected step
    model: 10 ms + 1 ms per request + 10 us per local context token."""
    books = Books(local_batch=8, local_tokens=800, offloaded_batch=2, offloaded_tokens=200)
    # local alone: 8 / (10 + 8 + 8 ms) = 307.7 tok/s; with this one: 11 / (10 + 11 + 8 ms + wait)
    # rises while the wait is under 11 / 307.7 - 29 ms = 6.75 ms
    assert _decide(books=books, decode=_decode(offload_stall_s=0.0065)) == (True, "memory_pressure")
    assert _decide(books=books, decode=_decode(offload_stall_s=0.0070)) == (False, "no_gain")
    # the first offload must pay for its wait alone: 9 / (10 + 9 + 8 ms + wait) > 307.7 below 2.25 ms
    first = Books(local_batch=8, local_tokens=800)
    assert _decide(books=first, decode=_decode(offload_stall_s=0.002)) == (True, "memory_pressure")
    assert _decide(books=first, decode=_decode(offload_stall_s=0.0025)) == (False, "no_gain")
    # nothing local: anything offloaded is a gain
    assert _decide(books=Books(0, 0, 3, 300), decode=_decode(offload_stall_s=0.05)) == (True, "memory_pressure")
    # not measured yet (a burst is placed before the first step measures it): not one probe at a
    # time, as with room locally, but every request whose batch pays for a wait as long as the local
    # attention, 10 us x the local tokens. 800 tokens: 9 / (10 + 9 + 8 + 8 ms) < 8 / 26 ms
    assert _decide(books=first, decode=_decode()) == (False, "memory_pressure_unmeasured")
    assert _decide(books=books, decode=_decode()) == (False, "memory_pressure_unmeasured")
    # 100 tokens: 9 / (10 + 9 + 1 + 1 ms) = 428.6 tok/s > 8 / 19 ms = 421.1; and with two offloaded
    short = Books(local_batch=8, local_tokens=100)
    assert _decide(books=short, decode=_decode()) == (True, "memory_pressure_unmeasured")
    assert _decide(books=dataclasses.replace(short, offloaded_batch=2), decode=_decode()) == (
        True,
        "memory_pressure_unmeasured",
    )


def test_under_memory_pressure_bandwidth_is_a_cost_not_a_wall() -> None:
    """The executor's room (OB_mem by capacity 2, compute 4) bounds what is offloaded under memory
    pressure; its bandwidth (here as fast as the decode instance's, OB 1) is charged as wait: the
    offloaded requests' coming context over the bandwidth ratio, less the local requests' coming
    context, read at 10 us a token. The injected step: 10 ms + 1 ms per request + 10 us per
    local token; the local batch alone: 8 / 26 ms = 307.7 tok/s."""
    books = Books(
        local_batch=8,
        local_tokens=800,
        offloaded_batch=10,
        offloaded_coming_tokens=2000,
        local_coming_tokens=1200,
        offloaded_spans=[(150, 250)] * 10,  # coming 200 each; 2500 held at once as they end
    )
    # 2000 + 75 (the smaller) over OB (1) x 1600, within capacity 2 x 1600. Excess: (2075 - 1200) x 10 us = 8.75 ms
    # (over the 2 ms measured), so 19 / (10 + 19 + 8 + 8.75 ms) = 415.3 tok/s > 307.7: offloaded
    assert _decide(books=books, bound=Bounds(2.0, 1.0, 4.0)) == (True, "memory_pressure")
    # an executor half as fast: (4150 - 1200) x 10 us = 29.5 ms, 19 / 66.5 ms = 285.7 < 307.7
    assert _decide(books=books, bound=Bounds(2.0, 0.5, 4.0)) == (False, "no_gain")
    # a quarter as fast: 71 ms of wait on a 37 ms step breaks the 100 ms SLO
    assert _decide(books=books, bound=Bounds(2.0, 0.25, 4.0)) == (False, "slo")
    # capacity still a wall: ten growing to 330 hold 3300 at once, coming to 3200 + 75, over 2 x 1600;
    # and so is compute (1 x 1600)
    longer = dataclasses.replace(books, offloaded_coming_tokens=3200, offloaded_spans=[(150, 330)] * 10)
    assert _decide(books=longer, bound=Bounds(2.0, 1.0, 4.0)) == (False, "c1")
    assert _decide(books=books, bound=Bounds(2.0, 1.0, 1.0)) == (False, "c1")
    # with room locally, no pressure: the paper's bound, bandwidth included (1 x 1600)
    room = {"decode_free_tokens": 1000, "books": dataclasses.replace(books, local_spans=[(100, 100)] * 8)}
    assert _decide(**room, bound=Bounds(2.0, 1.0, 4.0)) == (False, "c1")
    # not measured yet: the wait is the larger of the local attention (8 ms) and the excess
    assert _decide(books=books, bound=Bounds(2.0, 1.0, 4.0), decode=_decode()) == (True, "memory_pressure_unmeasured")
    assert _decide(books=books, bound=Bounds(2.0, 0.5, 4.0), decode=_decode()) == (False, "memory_pressure_unmeasured")


def test_room_now_is_not_room_for_what_local_requests_grow_to() -> None:
    """A burst of short prompts leaves the decode instance's KV mostly free at admission, yet its
    local requests grow to fill it: that is memory pressure too. Free 800 of 1600 tokens (50 blocks)."""
    room = {"decode_free_tokens": 800, "decode": _decode(offload_stall_s=0.002)}
    # eight of 100 tokens (7 blocks each) growing to 210 (14 blocks) take 56 blocks more: 896 tokens
    books = Books(local_batch=8, local_tokens=800, local_spans=[(100, 210)] * 8)
    assert _decide(**room, books=books) == (True, "memory_pressure")
    # growing to 175 (11 blocks), with this one at its 50th step: 32 more, 512 tokens: no pressure,
    # so offloaded only if the round trip hides (2 ms of a 26 ms step does not)
    assert _decide(**room, books=dataclasses.replace(books, local_spans=[(100, 175)] * 8)) == (False, "not_hidden")


def test_local_requests_ending_at_different_times_never_hold_their_maxima_at_once() -> None:
    """Their maximum lengths summed (710 + 800 + this one's 100 > 1600) would say the decode
    instance cannot take this request; but the first ends in 10 steps, before the second has
    grown: the most the three hold at once is 56 blocks (45 + 7 + 4, at that step), 5 more than
    the 51 they hold now."""
    books = Books(local_batch=2, local_tokens=800, local_spans=[(700, 710), (100, 800)])
    room = {"decode": _decode(offload_stall_s=0.002), "books": books}
    assert _decide(**room, decode_free_tokens=80) == (False, "not_hidden")  # kept local: it fits
    # one block less: that is pressure, and 3 / (10 + 3 + 8 + 2 ms) beats the local 2 / 20 ms
    assert _decide(**room, decode_free_tokens=64) == (True, "memory_pressure")


def test_the_peak_in_blocks_is_the_brute_force_one() -> None:
    """`peak_blocks` against stepping every request a token at a time, on random spans."""
    rng = random.Random(5)
    for _ in range(200):
        spans = [(n, n + rng.randrange(0, 60)) for n in (rng.randrange(1, 90) for _ in range(rng.randrange(0, 6)))]
        size = rng.choice([1, 4, 16])
        brute = max(
            (sum(-(-(n + t) // size) for n, m in spans if n + t <= m) for t in range(61)),
            default=0,
        )
        assert peak_blocks(spans, size) == brute, (spans, size)


def test_with_room_locally_offloading_needs_a_hidden_round_trip() -> None:
    room = {"decode_free_tokens": 1000}
    assert _decide(**room) == (False, "not_hidden")  # 2 ms of wait on a 28 ms step: over 5%
    assert _decide(**room, decode=_decode(offload_stall_s=0.0005)) == (True, "hidden")
    # never measured: a wait as long as local attention, 10 us x 800 tokens = 8 ms, is not hidden
    # in a 26 ms step; 10 us x 90 tokens = 0.9 ms is, within 5% of a 18.9 ms one
    assert _decide(**room, decode=_decode(), books=Books(8, 800, 0, 0)) == (False, "unmeasured")
    assert _decide(**room, decode=_decode(), books=Books(8, 90, 0, 0)) == (True, "unmeasured")


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


def test_an_executor_reports_the_bandwidth_it_gives_under_load() -> None:
    """Its profile is taken idle; steps that run 3x slower (the colocated prefill takes the
    device) scale the model it reports, so the bandwidth bound shrinks by 3, and an old load is
    forgotten."""
    profile = StepModel(0.001, 0.0001, 1e-6)
    slow = Slowdown(min_steps=4, ttl_s=10.0)
    for i in range(3):
        slow.observe(0.03, 0.01, now=float(i))
    assert slow.factor(now=3.0) == 1.0  # too few steps to say
    slow.observe(0.03, 0.01, now=3.0)
    assert slow.factor(now=3.0) == pytest.approx(3.0)
    assert slow.scaled(profile, now=3.0).per_token_s == pytest.approx(3e-6)
    slow.observe(float("nan"), 0.01, now=3.0)  # ignored, as is a step with nothing predicted
    slow.observe(0.5, 0.0, now=3.0)
    assert slow.factor(now=3.0) == pytest.approx(3.0)
    assert slow.factor(now=13.5) == 1.0  # ten seconds without steps: back to the profile
    for i in range(4):
        slow.observe(10.0, 0.001, now=20.0 + i)
    assert slow.factor(now=24.0) == slow.limit  # bounded either way


def test_grid_is_fixed_whatever_the_pool() -> None:
    """Two batch sizes and two contexts, clipped only by the model's context; never by the pool
    (a grid sized from a 384-token pool held batch 1 alone and left the slope to noise)."""
    full = [(1, 64), (8, 64), (1, 512), (8, 512)]
    assert grid() == grid(2048) == grid(512 + RUNS + 2) == full
    # a short model context clips the long context, and the short one to half of it
    assert grid(100) == [(1, 37), (8, 37), (1, 74), (8, 74)]
    assert grid(RUNS + 4) == [(1, 1), (8, 1), (1, 2), (8, 2)]
    with pytest.raises(ValueError, match="no room to profile"):
        grid(RUNS + 3)
    for max_len in (RUNS + 4, 100, 300, 2048):
        points = grid(max_len)
        assert len({b for b, _ in points}) == 2 and len({c for _, c in points}) == 2
        assert all(context + RUNS + 2 <= max_len for _, context in points)  # Engine.validate
    # the largest point: 8 requests of 512 + RUNS + 2 = 538 tokens, 34 blocks of 16 each
    assert blocks_needed(grid(), 16) == 8 * 34
    assert blocks_needed(grid(100), 8) == 8 * 13  # 74 + 26 = 100 tokens, 13 blocks of 8


def test_a_non_positive_slope_is_not_profiled() -> None:
    """A per-token cost at or below zero is no model: never an infinite attention bandwidth."""
    for per_token in (0.0, -1e-7, float("nan"), float("inf")):
        assert StepModel.from_wire([0.001, 1e-5, per_token]) is None
        assert not StepModel(0.001, 1e-5, per_token).profiled
    assert StepModel.from_wire([float("nan"), 1e-5, 1e-7]) is None
    assert StepModel.from_wire([0.001, 1e-5, 1e-7]) == StepModel(0.001, 1e-5, 1e-7)
    # noise that makes longer contexts look faster: the slope is clamped to 0, not profiled
    flat = StepModel.fit([(1, 64, 0.002), (8, 512, 0.003), (1, 512, 0.0019), (8, 4096, 0.0029)])
    assert flat.per_token_s == 0.0 and not flat.profiled
    assert StepModel.from_wire(flat.to_wire()) is None
    # an executor, a decode instance's attention or its step sent such a model: no bound at all,
    # and the policy refuses as not profiled (it used to read 1 / 1e-12 tokens/s and refuse by C1)
    d = _decode()
    zero = StepModel(0.0001, 1e-6, 0.0).to_wire()
    for instance in (
        dataclasses.replace(d, attention_model=zero),
        dataclasses.replace(d, step_model=zero),
    ):
        assert bounds(instance, [instance], [_executor()], 100, SLO) is None
    assert bounds(d, [d], [_executor(per_token_s=0.0)], 100, SLO) is None
    assert bounds(d, [d], [_executor(), _executor(per_token_s=-1e-7)], 100, SLO) is None
    assert _decide(decode=_decode(step_model=zero)) == (False, "not_profiled")


def test_bounds_read_injected_step_models() -> None:
    """Every bound comes from the models the heartbeats carry, none from a clamp."""
    d = _decode(
        step_model=StepModel(0.020, 0.002, 20e-6).to_wire(),
        attention_model=StepModel(0.0, 0.0, 4e-6).to_wire(),
        total_blocks=50,  # 800 KV tokens
        free_blocks=50,
        max_num_seqs=32,
    )
    b = bounds(d, [d], [_executor(blocks=100, per_token_s=16e-6)], mean_len=200, slo_s=SLO)
    assert b is not None
    assert b.memory_capacity == pytest.approx(1600 / 800)
    assert b.memory_bandwidth == pytest.approx(4e-6 / 16e-6)
    # B_tpot = min(32 seats, 800 / 200 = 4 by KV, 0.08 / (0.002 + 0.004) = 13.3 by SLO) = 4;
    # B_max = min(32, 0.08 / 0.002 = 40) = 32
    assert b.compute == pytest.approx((32 - 4) / 4)
    assert b.offload == pytest.approx(0.25)


# A made-up step time, so that the profiling tests below check what was measured, on which
# memory, and what was fitted, without depending on this machine's timing.
TRUE = StepModel(0.003, 0.0002, 2e-6)


def _fake_clock(
    monkeypatch: pytest.MonkeyPatch, state: Callable[[], tuple[int, int]], flat_first: bool = False
) -> list[tuple[int, int]]:
    """Replace `_best_time`: run the step for real (the profile's requests must be in place), and
    report TRUE's time of the batch and context tokens the instance holds (`state`) instead of
    the measured one. `flat_first`: the first four points report one time (an unusable fit)."""
    seen: list[tuple[int, int]] = []

    def best_time(run: Callable[[], object], budget_s: float, sync: Callable[[], None]) -> float:
        batch, tokens = state()
        seen.append((batch, tokens))
        for _ in range(3):
            run()
            sync()
        return 0.001 if flat_first and len(seen) <= 4 else TRUE.time(batch, tokens)

    monkeypatch.setattr(profiling, "_best_time", best_time)
    return seen


def _recorder(monkeypatch: pytest.MonkeyPatch, name: str) -> list[weakref.ref[object]]:
    """Record (weakly: the profile must drop them) every scratch `Engine` or `ExecutorCore`
    the profiling module makes."""
    made: list[weakref.ref[object]] = []
    base = getattr(profiling, name)

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(profiling, name, Recording)
    return made


def _held(engine_or_core: Engine | ExecutorCore) -> tuple[int, int]:
    """(requests, context tokens) the instance holds now: the point being timed."""
    owners = engine_or_core.blocks.owners()
    return len(owners), sum(engine_or_core.blocks.num_tokens(o) for o in owners)


def _tiny_engine(llama_dir: Path) -> Engine:
    """An engine with 384 tokens of KV (512 bytes each), as the auto-policy integration test gives
    its decode instances: too small for the profile grid."""
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=16, kv_cache_bytes=384 * 512))
    assert engine.capacity_tokens == 384 < blocks_needed(grid(), 16) * 16
    for layer in range(engine.spec.num_layers):  # a sentinel the profile must not overwrite
        engine.pool.k[layer].fill_(7.0)
        engine.pool.v[layer].fill_(7.0)
    return engine


def _pool_untouched(engine: Engine) -> bool:
    return all(bool((t == 7.0).all()) for t in engine.pool.k + engine.pool.v)


def _latest_scratch(made: list[weakref.ref[object]], kind: type) -> Callable[[], tuple[int, int]]:
    """What the fake clock reads: the blocks held by the scratch object made last (alive while timed)."""

    def state() -> tuple[int, int]:
        scratch = made[-1]()
        assert isinstance(scratch, kind)
        return _held(scratch)

    return state


def test_a_tiny_pool_profiles_its_steps_on_a_scratch_engine(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _tiny_engine(llama_dir)
    made = _recorder(monkeypatch, "Engine")

    state = _latest_scratch(made, Engine)
    seen = _fake_clock(monkeypatch, state)
    model = profile_engine(engine, budget_s=0.0)
    # one scratch engine, on the same weights, with a pool just big enough for the grid's largest point
    assert len(made) == 1 and made[0]() is None  # and dropped before the profile returned
    assert seen == [(b, b * c) for b, c in grid(engine.spec.max_model_len)]
    for got, want in zip(model.to_wire(), TRUE.to_wire(), strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert model.profiled and StepModel.from_wire(model.to_wire()) == model
    # the engine's own pool and blocks were never touched
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.requests
    engine.check_integrity()
    assert _pool_untouched(engine)


def test_the_scratch_engine_shares_the_weights(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _tiny_engine(llama_dir)
    scratch: list[Engine] = []

    def state() -> tuple[int, int]:
        return _held(scratch[-1])

    class Keeping(Engine):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            scratch.append(self)

    monkeypatch.setattr(profiling, "Engine", Keeping)
    _fake_clock(monkeypatch, state)
    profile_engine(engine, budget_s=0.0)
    (kept,) = scratch
    assert kept.model is engine.model
    assert kept.blocks.num_blocks == blocks_needed(grid(engine.spec.max_model_len), 16)
    assert kept.blocks.num_free_blocks == kept.blocks.num_blocks and not kept.requests


def test_an_unusable_fit_is_profiled_once_more(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _tiny_engine(llama_dir)
    made = _recorder(monkeypatch, "Engine")

    state = _latest_scratch(made, Engine)
    seen = _fake_clock(monkeypatch, state, flat_first=True)
    model = profile_engine(engine, budget_s=0.0)
    assert len(seen) == 8 and model.per_token_s == pytest.approx(TRUE.per_token_s)


def test_attention_on_a_tiny_pool_profiles_on_a_scratch_core(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _tiny_engine(llama_dir)
    made = _recorder(monkeypatch, "ExecutorCore")

    state = _latest_scratch(made, ExecutorCore)
    seen = _fake_clock(monkeypatch, state)
    model = profile_decode_attention(engine, budget_s=0.0)
    assert len(made) == 1 and made[0]() is None
    assert seen == [(b, b * c) for b, c in grid()]
    assert model.per_token_s == pytest.approx(TRUE.per_token_s) and model.profiled
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and _pool_untouched(engine)
    # an executor with as small a pool does the same, and its own core is left as it was
    spec = engine.spec
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 16, spec.dtype)
    core = ExecutorCore(layout, 24, get_backend("torch"), spec.head_dim**-0.5, torch.device("cpu"))
    made.clear()
    seen.clear()
    model = profile_executor(core, spec.num_heads, budget_s=0.0)
    assert len(made) == 1 and made[0]() is None
    assert seen == [(b, b * c) for b, c in grid()] and model.profiled
    assert core.blocks.num_free_blocks == 24 and not core.max_tokens and bool((core.pool.k[0] == 0).all())


def test_profiles_leave_the_pools_empty(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real runs on pools that hold the grid (no scratch): nothing stays allocated. Timings are
    real here, so only their shape is checked (neighbours on the same cores can flatten a fit)."""
    engines, cores = _recorder(monkeypatch, "Engine"), _recorder(monkeypatch, "ExecutorCore")
    engine = Engine.from_folder(llama_dir, EngineConfig(block_size=8, kv_cache_bytes=4 * 2**20))
    assert engine.blocks.num_blocks >= blocks_needed(grid(), 8)
    model = profile_engine(engine, budget_s=0.01)
    assert all(math.isfinite(v) and v >= 0 for v in model.to_wire())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.requests
    spec = engine.spec
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 8, spec.dtype)
    core = ExecutorCore(layout, 1024, get_backend("torch"), spec.head_dim**-0.5, torch.device("cpu"))
    for attention in (
        profile_executor(core, spec.num_heads, budget_s=0.01),
        profile_decode_attention(engine, budget_s=0.01),
    ):
        assert all(math.isfinite(v) and v >= 0 for v in attention.to_wire())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert core.blocks.num_free_blocks == 1024 and not core.max_tokens and core.reserved_blocks == 0
    # no scratch engine; one core, profile_decode_attention's view of the engine's own pool
    assert not engines and len(cores) == 1

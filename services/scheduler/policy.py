"""The load-aware offloading policy: which admitted requests keep their KV and attention on an executor.

Offloading buys a larger decode batch (an offloaded request's KV lives on the executor, not in
the decode instance's memory) at the price of a per-layer round trip, which costs nothing only
while local attention hides it. The policy bounds the offload ratio (offloaded over local
attention work) as in the paper (arXiv 2503.20552; docs/services.md), from what the instances measured at start-up
(`common.step_model.StepModel`, fitted by `common.profiling`) and report in their heartbeats:

* memory: OB_mem = min(executor KV capacity / decode KV capacity,
                       executor attention bandwidth / decode attention bandwidth),
  where an instance's attention bandwidth is 1 / `per_token_s` of its profiled decode
  attention (`attention_model`: tokens of KV per second, measured alike on both sides);
* compute: OB_comp = (B_max - B_tpot) / B_tpot, where B_tpot is the largest decode batch that
  meets the TPOT SLO and fits the decode instance's KV without offloading (at the mean context
  length its batch will have over its coming steps, each request halfway from its length now to
  its maximum, this request included: `coming_length`), and B_max the
  largest whose non-attention work meets the SLO (attention entirely offloaded and hidden);
* OB = min(OB_mem, OB_comp).

A request is offloaded only if
  (C1) the KV of the offloaded requests, this one included, stays within OB times the decode
       instance's KV capacity, and the executor has room for this one's prompt and a block to grow
       by (it grows requests block by block and hands them back to decode when full). Their KV is
       the smaller of two measures: their mean lengths over the steps they have left (each
       halfway from its length now to its maximum: `coming_length`) and the most they will hold
       at once (`peak_tokens`: each grows a token a step to its maximum, then ends). The mean
       alone over-counts requests near their ends: under a burst the executor idled as its first
       requests, all started together, neared their ends while requests waited (1.34x of plain PD
       with 32 requests on the memory-bound benchmark); the peak alone holds a burst's start to
       what fits if every request runs to its maximum, where the executor hands back what does
       not fit (32 requests, one repeat each: 115 output tok/s with the peak alone, 125 and 128
       with the mean, 130 with the smaller). Their maximum lengths summed offloaded half as much
       under a burst (1.13x against 1.36x). Under memory pressure (below) OB's bandwidth part is
       a cost rather than a wall: the executors' attention beyond what the decode instance reads
       meanwhile (`excess_attention_s`) counts as executor wait in the SLO and output-rate checks.
       The paper's wall keeps remote attention hidden whatever the batch buys; but where the
       decode step is mostly GEMMs that read every weight (a memory-bound decode), a batch twice
       the size costs little more per step than the wait, and the wall held the executor to the
       decode instance's size when it had room for twice that (OB_mem by bandwidth ~1 on a CPU,
       where both read the same memory): 1.36x of plain PD on the memory-bound benchmark with
       the wall, 1.56x without (median of three repeats; docs/benchmarks.md);
  (C2) unless the decode instance is under memory pressure (below): the offloaded-to-local
       ratios of the current total context and of the batch size, with this request, stay
       within OB, so that remote attention hides under local attention (with nothing local to
       hide behind, nothing is offloaded). Under memory pressure a request kept local waits for
       room rather than runs sooner, so C2 would leave the executor idle exactly when a few long
       local requests fill the decode instance; C1 and the SLO still bound what is offloaded;
  (SLO) the decode step predicted with it, plus the executor wait the decode instance measures
       (`offload_stall_s`), meets the TPOT SLO;
and only if it is worth it, in one of two ways:
  (hidden) the decode instance has room for the request, and its measured executor wait shows
       the round trip hides under local attention: offloading then costs nothing;
  (memory pressure) the decode instance cannot hold the request without risking preemption (its
       free KV below what its local requests and this one will add at the worst moment:
       `under_pressure`), so kept local it would wait for room; offloaded, it joins the batch now but
       every step pays the exposed wait. It is offloaded only when the predicted output rate
       rises: (batch + 1) / (step(batch + 1) + wait) against local / step(local), the rate of
       the local requests alone, which is what the instance would run without offloading.
On a GPU the round trip hides under local attention and requests are offloaded up to the bound;
on a CPU, where it may not, offloading happens only where the batch it buys pays for the wait.
Until a decode instance has measured its wait, the wait is taken to be as long as the local
attention it should hide under (a burst is placed before the first step measures anything, and
a request is placed once), and the first offloaded steps tell which case holds; a measurement
expires when no step has had offloaded rows for a while (`services.decode.service.STALL_TTL_S`),
so that a wait measured under a load that has passed does not rule for ever.
A request this policy keeps local under memory pressure waits at the scheduler, not on the decode
instance, and is decided again when room may have appeared (`Scheduler.drain`, in service.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.messages import InstanceLoad
from common.step_model import StepModel

HIDDEN_FRACTION = 0.05  # an executor wait below this share of the step counts as hidden


@dataclass
class Books:
    """What one decode instance carries now, from the scheduler's own in-flight table."""

    local_batch: int = 0
    local_tokens: int = 0  # current context tokens of its local requests
    offloaded_batch: int = 0
    offloaded_tokens: int = 0
    # The offloaded requests' `coming_length`s, summed: the attention work they bring the executor.
    offloaded_coming_tokens: float = 0.0
    local_coming_tokens: float = 0.0  # the local requests' `coming_length`s, summed
    offloaded_spans: list[tuple[int, int]] = field(default_factory=list)  # (length now, maximum) of each
    local_spans: list[tuple[int, int]] = field(default_factory=list)  # the same of the local requests

    @property
    def coming_tokens(self) -> float:
        """Every request's `coming_length`, summed: what B_tpot's mean length is made of."""
        return self.local_coming_tokens + self.offloaded_coming_tokens


def coming_length(length: int, maximum: int) -> float:
    """A request's mean context over the steps it has left, halfway from its length now to its
    maximum. Its length now would say, at a burst's start, that a decode instance holds its
    capacity over the prompts alone, ten times what it holds once they grow; its maximum, that it
    holds half of what it does over their lives."""
    return (length + maximum) / 2


def peak_tokens(spans: Iterable[tuple[int, int]]) -> int:
    """The most KV tokens requests (length now, maximum) hold at once if each grows by a token a
    step until its maximum and then ends. The total only grows between two ends, so its peak is
    at the step one of them ends (or now): request i has r_i = maximum_i - length_i steps left,
    and at step r_k holds length_i + r_k if r_i >= r_k, nothing otherwise."""
    remaining = sorted(((m - n, n) for n, m in spans), reverse=True)  # most steps left first
    peak = held = 0
    for count, (left, length) in enumerate(remaining, start=1):
        held += length  # the requests with at least `left` steps left, at their lengths now
        peak = max(peak, held + count * max(0, left))
    return peak


@dataclass(frozen=True)
class Bounds:
    memory_capacity: float
    memory_bandwidth: float
    compute: float

    @property
    def offload(self) -> float:
        return min(self.memory_capacity, self.memory_bandwidth, self.compute)


@dataclass(frozen=True)
class Decision:
    offload: bool
    reason: str  # a short fixed label, for logs and the decisions counter


def capacity_tokens(load: InstanceLoad) -> int:
    return load.total_blocks * load.block_size


def bounds(
    decode: InstanceLoad, decodes: list[InstanceLoad], executors: list[InstanceLoad], mean_len: float, slo_s: float
) -> Bounds | None:
    """OB_mem over the cluster and OB_comp of `decode`; None when an instance is not profiled
    (it sent no model, or one whose per-token cost is not positive: `StepModel.from_wire`)."""
    decode_models = [StepModel.from_wire(d.attention_model) for d in decodes]
    executor_models = [StepModel.from_wire(e.attention_model) for e in executors]
    model = StepModel.from_wire(decode.step_model)
    if model is None or None in decode_models or None in executor_models or not executors:
        return None
    capacity = sum(map(capacity_tokens, executors)) / max(1, sum(map(capacity_tokens, decodes)))
    # from_wire admits only models with a positive per-token cost: every bandwidth is finite
    bandwidth = sum(1 / m.per_token_s for m in executor_models if m) / sum(
        1 / m.per_token_s for m in decode_models if m
    )
    seats = decode.max_num_seqs or 1
    mean_len = max(mean_len, 1.0)
    # B_tpot: the SLO with every request's attention local, and the decode instance's own KV
    b_slo = (slo_s - model.fixed_s) / (model.per_seq_s + model.per_token_s * mean_len)
    b_tpot = min(seats, capacity_tokens(decode) / mean_len, b_slo)
    # B_max: the SLO with attention costing the decode instance nothing
    b_max = min(seats, (slo_s - model.fixed_s) / model.per_seq_s if model.per_seq_s > 0 else math.inf)
    compute = max(0.0, (b_max - b_tpot) / b_tpot) if b_tpot >= 1 else 0.0
    return Bounds(capacity, bandwidth, compute)


def decide(
    *,
    prompt_tokens: int,
    max_tokens: int,
    decode: InstanceLoad,
    decode_free_tokens: int,
    books: Books,
    executor_free_tokens: int | None,
    executor_need_tokens: int,
    bound: Bounds | None,
    slo_s: float,
) -> Decision:
    """Offload this request (its KV to the executor beside its prefill instance) or keep it local?"""
    model = StepModel.from_wire(decode.step_model)
    if executor_free_tokens is None:
        return Decision(False, "no_executor")
    if bound is None or model is None:
        return Decision(False, "not_profiled")
    ob = bound.offload
    # An executor takes the prompt's blocks and one to grow by; it grows the request a block at a
    # time and hands it back to decode when full (`ExecutorCore.begin_step`), so no maximum length.
    if executor_free_tokens < executor_need_tokens:
        return Decision(False, "executor_full")
    pressure = under_pressure(decode, decode_free_tokens, books, prompt_tokens, max_tokens)
    offloaded_coming = books.offloaded_coming_tokens + coming_length(prompt_tokens, max_tokens)
    # Under memory pressure the bandwidth bound is a cost rather than a wall (module docstring):
    # `excess` below charges the executor's attention beyond the local one to every step.
    limit = min(bound.memory_capacity, bound.compute) if pressure else ob
    offloaded_kv = min(offloaded_coming, peak_tokens([*books.offloaded_spans, (prompt_tokens, max_tokens)]))
    if offloaded_kv > limit * capacity_tokens(decode):
        return Decision(False, "c1")
    # Under memory pressure C2 does not apply: kept local, the request would wait for room (module docstring).
    if not pressure and (
        books.offloaded_tokens + prompt_tokens > ob * books.local_tokens
        or books.offloaded_batch + 1 > ob * books.local_batch
    ):
        return Decision(False, "c2")
    batch = books.local_batch + books.offloaded_batch
    stall = decode.offload_stall_s
    excess = excess_attention_s(decode, books, offloaded_coming, bound) if pressure else 0.0
    if model.time(batch + 1, books.local_tokens) + max(stall or 0.0, excess) > slo_s:
        return Decision(False, "slo")
    if stall is None:
        # Never measured. A burst is placed before any step has measured the wait, and a request
        # is placed once, so probing one request at a time would leave the executor idle under a
        # burst, and the probe slows every step of the batch while it runs. Assume instead a wait
        # as long as the local attention it should hide under (a round trip twice that, as a CPU
        # shows; a GPU hides it, and its first offloaded steps then say so).
        prior = model.per_token_s * books.local_tokens
        if pressure:
            return Decision(output_rate_rises(model, books, max(prior, excess)), "memory_pressure_unmeasured")
        return Decision(prior <= HIDDEN_FRACTION * model.time(batch, books.local_tokens), "unmeasured")
    if pressure:
        if output_rate_rises(model, books, max(stall, excess)):
            return Decision(True, "memory_pressure")
        return Decision(False, "no_gain")
    if stall <= HIDDEN_FRACTION * model.time(batch, books.local_tokens):
        return Decision(True, "hidden")
    return Decision(False, "not_hidden")


def under_pressure(
    decode: InstanceLoad, decode_free_tokens: int, books: Books, prompt_tokens: int, max_tokens: int
) -> bool:
    """Memory pressure: the decode instance's free KV cannot take what its local requests and this
    one will still add at the worst moment (`peak_blocks`, less the blocks they hold now), so kept
    local it would wait for room or be preempted. Its free space now is not enough: requests
    admitted with short prompts take it as they grow. Their maximum lengths summed would be too
    much: requests started at different times do not all reach their maximum at once, and that sum
    kept the decode instance at 3.8 requests on average on the memory-bound benchmark where plain
    PD, preempting, runs 5.9 in the same memory."""
    size = decode.block_size
    now = sum(-(-length // size) for length, _ in books.local_spans)
    growth = peak_blocks([*books.local_spans, (prompt_tokens, max_tokens)], size) - now
    return decode_free_tokens < growth * size


def peak_blocks(spans: Iterable[tuple[int, int]], block_size: int) -> int:
    """`peak_tokens` in whole blocks, as an instance allocates them: the most blocks requests
    (length now, maximum) hold at once if each grows by a token a step until its maximum and then
    ends. What they hold only grows between two ends, so its peak is now or at an end."""
    spans = list(spans)
    ends = {max(0, maximum - length) for length, maximum in spans}
    return max(
        (sum(-(-(n + t) // block_size) for n, m in spans if m - n >= t) for t in {0, *ends}),
        default=0,
    )


def excess_attention_s(decode: InstanceLoad, books: Books, offloaded_coming: float, bound: Bounds) -> float:
    """Seconds a step waits for the executors beyond its own attention, from bandwidth alone: the
    offloaded requests' coming context (this one's included) read at the executors' attention
    bandwidth, less the local requests' read at the decode instance's, which runs meanwhile.
    The wait a decode instance measures shows the round trip of what is offloaded now; this is
    what the offloaded work, grown by this request, must cost at least."""
    attention = StepModel.from_wire(decode.attention_model)
    if attention is None:  # then `bounds` gave no bound and `decide` refused as not profiled
        return 0.0
    return attention.per_token_s * max(0.0, offloaded_coming / bound.memory_bandwidth - books.local_coming_tokens)


def output_rate_rises(model: StepModel, books: Books, stall_s: float) -> bool:
    """Would the decode instance emit more tokens per second with this request offloaded (its whole
    batch, paying the measured executor wait every step) than with its local requests alone?"""
    batch = books.local_batch + books.offloaded_batch + 1
    with_offload = batch / (model.time(batch, books.local_tokens) + stall_s)
    if books.local_batch == 0:
        return True
    return with_offload > books.local_batch / model.time(books.local_batch, books.local_tokens)

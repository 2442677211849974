"""The scheduler: a registry of instances fed by their heartbeats, routing, and request lifecycle.

It holds no KV and no model. For each request it picks the least-loaded prefill instance and
the decode instance with the most free KV, asks the prefill instance to take it, and remembers
the pair until the request finishes, so that when an instance stops heartbeating, the requests
it held end with a clear error (and an abort that frees their blocks everywhere else) instead
of waiting forever. Gateways heartbeat too: the requests of a gateway silent for
`gateway_dead_after_s` are aborted, since their clients went with it and nothing else would stop
them before their `max_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import structlog
from prometheus_client import Counter, Gauge

from common import settings_catalog as catalog
from common.bus import Bus, Reply, ServiceUnavailable
from common.config import parse_offload_ratio
from common.health import HEALTH
from common.keepalive import KeepAlive
from common.liveness import Hearing
from common.messages import (
    AbortRequest,
    Ack,
    Admitted,
    ClusterStatus,
    GatewayHeartbeat,
    InstanceLoad,
    PrefillTask,
    RequestsEnded,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
)
from common.settings import field, load_or_exit
from services.scheduler import policy

log = structlog.get_logger("scheduler")

INSTANCES = Gauge("adrenaline_scheduler_instances", "Live instances seen through their heartbeats", ["role"])
INFLIGHT = Gauge("adrenaline_scheduler_inflight_requests", "Requests routed and not yet finished")
QUEUED = Gauge(
    "adrenaline_scheduler_queued_requests",
    "Requests accepted and waiting at the scheduler for room on a decode instance or an executor",
)
SUBMISSIONS = Counter(
    "adrenaline_scheduler_submissions_total", "Submitted requests by outcome (HTTP-like status)", ["status"]
)
LOST = Counter("adrenaline_scheduler_instances_lost_total", "Instances that stopped heartbeating")
GATEWAYS = Gauge("adrenaline_scheduler_gateways", "Gateways heard from within gateway_dead_after_s")
GATEWAYS_LOST = Counter(
    "adrenaline_scheduler_gateways_lost_total", "Gateways that stopped heartbeating; their requests were aborted"
)
GATEWAY_ABORTS = Counter(
    "adrenaline_scheduler_gateway_aborts_total", "Requests aborted because their gateway stopped heartbeating"
)
MAX_GATEWAYS = 10_000  # gateways tracked at once; past it the longest silent is forgotten (never judged)
OFFLOAD_BOUND = Gauge(
    "adrenaline_scheduler_offload_bound",
    "The auto policy's bounds on the offload ratio at the last admission (memory_capacity, "
    "memory_bandwidth, compute; their minimum is the bound applied)",
    ["bound"],
)
DECISIONS = Counter(
    "adrenaline_scheduler_offload_decisions_total",
    "The auto policy's per-request decisions and why (see services/scheduler/policy.py)",
    ["offloaded", "reason"],
)


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings(catalog.ControlPlaneSettings):
    """The scheduler's settings (docs/settings.md)."""

    dead_after_s: float = field(catalog.DEAD_AFTER_S)
    gateway_dead_after_s: float = field(catalog.GATEWAY_DEAD_AFTER_S)
    request_timeout_s: float = field(catalog.REQUEST_TIMEOUT_S)
    metrics_host: str = field(catalog.METRICS_HOST)
    metrics_port: int = field(catalog.METRICS_PORT)
    offload_ratio: str = field(catalog.OFFLOAD_RATIO)
    tpot_slo_ms: float = field(catalog.TPOT_SLO_MS)
    max_queued_requests: int = field(catalog.MAX_QUEUED_REQUESTS)

    @property
    def fixed_ratio(self) -> float | None:
        """The fixed offload ratio, or None for the auto policy."""
        return parse_offload_ratio(self.offload_ratio)

    @classmethod
    def parse(cls, argv: list[str] | None) -> SchedulerSettings:
        """From flags and ADRENALINE_* variables; a bad value exits with a message naming it."""
        settings: SchedulerSettings = load_or_exit(cls, argv, "python -m services.scheduler")
        return settings


def _whole_blocks(tokens: int, block_size: int) -> int:
    """`tokens` rounded up to whole blocks, in tokens."""
    return -(-tokens // block_size) * block_size


@dataclass
class _Instance:
    load: InstanceLoad
    seen: float


@dataclass
class _InFlight:
    prefill_id: str
    decode_id: str
    token_subject: str
    kv_tokens: int  # what the decode instance (or the executor) must hold on admission
    prompt_tokens: int
    max_tokens: int  # prompt + max_new_tokens: the most KV it can ever hold
    executor_id: str = ""  # offloaded: its KV and decode attention live on this executor
    generated: int = 0  # tokens generated so far, as its decode instance's last heartbeat said
    admitted: bool = False  # KV landed on the decode instance (or the executor)
    admitted_at: float = 0.0  # when we heard so; heartbeats older than this do not show its blocks yet


@dataclass(frozen=True)
class _Route:
    """Where a request goes: its prefill instance, decode instance and, offloaded, executor."""

    prefill: InstanceLoad
    decode: InstanceLoad
    executor: InstanceLoad | None
    why: str  # the offload decision's reason
    need: int  # KV tokens the decode instance (or the executor) must hold on admission
    max_tokens: int


class _Refusal(NamedTuple):
    status: int  # HTTP-like
    error: str


class Scheduler:
    def __init__(self, settings: SchedulerSettings, bus: Bus) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.bus = bus
        self.instances: dict[str, _Instance] = {}
        self.inflight: dict[str, _InFlight] = {}
        self.routed = 0  # requests routed so far, for the fixed offload ratio
        self.dispatches: set[asyncio.Task[None]] = set()  # routed requests waiting for their prefill's ack
        # Accepted, not yet routed: waiting here, first come first served, for room on their decode
        # instance or an executor (`_offload_target`), rather than in one decode instance's queue.
        self.held: dict[str, SubmitRequest] = {}
        self.keepalive = KeepAlive(bus)  # the held requests' gateways hear that they wait
        # token subject of each gateway heard from -> when last heard (monotonic), least recent first.
        # Only gateways heard from are judged: a client of our own (a test, a tool) that submits
        # without heartbeating keeps its requests.
        self.gateways: dict[str, float] = {}
        # ticked by the reap loop, every dead_after_s / 4
        self.hearing = Hearing(bus, settings.subjects_prefix, settings.dead_after_s, tick_s=settings.dead_after_s / 4)

    # ---- registry --------------------------------------------------------------------------
    async def on_load(self, load: InstanceLoad, reply: Reply | None) -> None:
        known = self.instances.get(load.instance_id)
        if known is not None and known.load.ucx_address != load.ucx_address:
            # A new UCX worker under the same id: the process restarted (a supervisor brought it back
            # sooner than `dead_after_s`), and whatever the old one held is gone with it.
            log.warning("instance restarted", instance_id=load.instance_id, role=load.role)
            del self.instances[load.instance_id]
            LOST.inc()
            await self._fail_requests_on({load.instance_id})
            known = None
        if known is None:  # how old its heartbeat was on arrival tells a backlog from a silence
            late = round(time.time() - load.sent_at, 3) if load.sent_at else None
            log.info("instance joined", instance_id=load.instance_id, role=load.role, heartbeat_age_s=late)
        self.instances[load.instance_id] = _Instance(load, time.monotonic())
        for rid, length in load.lengths:  # a decode instance's requests, as long as they are now
            flight = self.inflight.get(rid)
            if flight is not None and flight.decode_id == load.instance_id:
                flight.generated = max(0, length - flight.prompt_tokens)
        if load.role in ("decode", "executor"):  # its room now shows
            await self.drain()

    async def on_gateway_heartbeat(self, heartbeat: GatewayHeartbeat, reply: Reply | None) -> None:
        self.gateways.pop(heartbeat.token_subject, None)  # to the recent end
        self.gateways[heartbeat.token_subject] = time.monotonic()
        while len(self.gateways) > MAX_GATEWAYS:
            del self.gateways[next(iter(self.gateways))]

    async def reap_gateways(self) -> None:
        """Abort every request of a gateway silent for `gateway_dead_after_s`, and forget the gateway.

        Silence counts only while we could hear (`Hearing.since`): after a pause of ours or of
        NATS, a gateway has the whole bound again to be heard. The abort frees the requests' KV on
        every instance (they all hear aborts); nobody is left to tell.
        """
        now = time.monotonic()
        horizon = now - self.settings.gateway_dead_after_s
        silent = {subject for subject, seen in self.gateways.items() if max(seen, self.hearing.since) < horizon}
        for subject in silent:
            del self.gateways[subject]
        GATEWAYS.set(len(self.gateways))
        if not silent:
            return
        for rid in [rid for rid, submit in self.held.items() if submit.token_subject in silent]:
            del self.held[rid]  # nothing holds its KV: forgetting it is all there is to do
        QUEUED.set(len(self.held))
        orphans = [rid for rid, f in self.inflight.items() if f.token_subject in silent]
        GATEWAYS_LOST.inc(len(silent))
        log.warning("gateways lost", token_subjects=sorted(silent), requests=len(orphans))
        reason = f"its gateway was not heard from for {self.settings.gateway_dead_after_s:g} s"
        for rid in orphans:
            del self.inflight[rid]
            GATEWAY_ABORTS.inc()
            log.info("aborted", request_id=rid, reason=reason)
            await self.bus.publish(self.subjects.abort, AbortRequest(rid, reason))

    def live(self, role: str) -> list[InstanceLoad]:
        """Instances of `role` heard within `dead_after_s`; while we cannot judge silence (we or NATS
        were paused: `common.liveness`), every instance not yet found dead."""
        now = time.monotonic()
        return [i.load for i in self.instances.values() if i.load.role == role and not self.hearing.silent(i.seen, now)]

    async def reap(self) -> None:
        """Forget instances that stopped heartbeating and fail the requests they held."""
        await self.hearing.tick()
        if not self.hearing.judging:
            HEALTH.not_ok("NATS round trips are failing or only just recovered")
            return
        HEALTH.ok()
        now = time.monotonic()
        dead = {iid for iid, inst in self.instances.items() if self.hearing.silent(inst.seen, now)}
        for iid in dead:
            log.warning(
                "instance lost",
                instance_id=iid,
                role=self.instances[iid].load.role,
                silent_s=round(now - self.instances[iid].seen, 2),
                hearing_for_s=round(now - self.hearing.since, 2),
            )
            del self.instances[iid]
            LOST.inc()
        for role in ("prefill", "decode", "executor"):
            INSTANCES.labels(role).set(len(self.live(role)))
        INFLIGHT.set(len(self.inflight))
        if dead:
            await self._fail_requests_on(dead)
        await self.reap_gateways()
        await self.drain()  # instances lost: a held request may now be refused (503) rather than wait
        await self.keep_held_alive()

    async def _fail_requests_on(self, dead: set[str]) -> None:
        """End every request that needed one of the `dead` instances, and tell its other holders."""
        for rid, f in list(self.inflight.items()):
            lost = next(
                (
                    iid
                    for iid, gone in (
                        (f.decode_id, f.decode_id in dead),
                        (f.executor_id, f.executor_id in dead),
                        (f.prefill_id, not f.admitted and f.prefill_id in dead),
                    )
                    if gone
                ),
                "",
            )
            if not lost:
                continue
            del self.inflight[rid]
            error = f"instance {lost} stopped responding while serving this request"
            await self.bus.publish(
                f.token_subject, TokenBatch([TokenEvent(rid, [], finish_reason="error", error=error)])
            )
            await self.bus.publish(self.subjects.abort, AbortRequest(rid, error))

    # ---- routing ---------------------------------------------------------------------------
    def _free_tokens(self, load: InstanceLoad) -> int:
        """Free KV tokens on a decode instance (or executor), less what its queued requests will
        take and what requests routed there will take that its last heartbeat cannot show yet (not
        admitted, or admitted after that heartbeat). Counted in whole blocks, as the instance
        allocates them: a multiple of the block size, so `free >= need` means the blocks fit."""
        seen = self.instances[load.instance_id].seen
        promised = sum(
            _whole_blocks(f.kv_tokens, load.block_size)
            for f in self.inflight.values()
            if (f.executor_id or f.decode_id) == load.instance_id and (not f.admitted or f.admitted_at > seen)
        )
        queued = _whole_blocks(load.waiting_tokens, load.block_size)
        return load.free_blocks * load.block_size - queued - promised

    @staticmethod
    def _executor_need(executor: InstanceLoad, prompt: int) -> int:
        """KV tokens an executor must have free to take a prompt: its blocks and one to grow by
        (what `ExecutorCore.can_admit` asks on top of the per-request watermark its heartbeat
        already leaves out)."""
        return _whole_blocks(prompt, executor.block_size) + executor.block_size

    def _queued(self, load: InstanceLoad) -> int:
        routed = sum(1 for f in self.inflight.values() if f.prefill_id == load.instance_id and not f.admitted)
        return max(load.waiting + load.running, routed)

    async def on_submit(self, submit: SubmitRequest, reply: Reply | None) -> None:
        if reply is None:
            return
        rid = submit.request_id
        outcome = self._route(submit)
        if isinstance(outcome, _Refusal) and (outcome.status != 429 or not self.held):
            await self._refuse(reply, rid, *outcome)
            return
        if outcome is None or self.held:  # first come, first served: behind those already waiting
            if len(self.held) >= self.settings.max_queued_requests:
                await self._refuse(reply, rid, 429, "the scheduler's queue is full; retry later")
                return
            self.held[rid] = submit
            QUEUED.set(len(self.held))
            log.info("queued", request_id=rid, ahead=len(self.held) - 1)
            SUBMISSIONS.labels("200").inc()
            await reply(SubmitReply(rid, True, 200))
            await self.drain()
            return
        assert isinstance(outcome, _Route)
        self._start(submit, outcome, reply)

    def _route(self, submit: SubmitRequest) -> _Route | _Refusal | None:
        """Where `submit` goes now; a refusal; or None: it should wait here for room (`_offload_target`)."""
        prefills, decodes = self.live("prefill"), self.live("decode")
        if not prefills or not decodes:
            missing = "prefill" if not prefills else "decode"
            return _Refusal(503, f"no {missing} instance is available")
        prompt = submit.num_tokens  # a resumed request's output so far is recomputed with its prompt
        max_tokens = len(submit.prompt_token_ids) + submit.sampling.max_new_tokens
        prefill = min(prefills, key=self._queued)
        decode = max(decodes, key=self._free_tokens)
        executor, why, hold = self._offload_target(prefill, decode, decodes, prompt, max_tokens)
        need = prompt + 1
        if executor is not None:  # the decode instance holds none of its KV; the executor its prompt, growing
            need = self._executor_need(executor, prompt)
            if self.settings.fixed_ratio is not None:
                decode = min(decodes, key=lambda d: d.running + d.waiting)
        else:
            largest = max(map(policy.capacity_tokens, decodes))
            if need > largest:
                return _Refusal(400, f"the prompt needs {need} KV tokens; the largest decode instance holds {largest}")
            if hold:
                return None
            if self._free_tokens(decode) < need:
                return _Refusal(429, "every decode instance's KV cache is full; retry later")
        return _Route(prefill, decode, executor, why, need, max_tokens)

    async def drain(self) -> None:
        """Route the held requests, oldest first, while the oldest has somewhere to go. Called when
        room may have appeared: a request ended or was admitted, an instance's heartbeat came. A
        request with nowhere to go and nothing in flight that could make room (every KV cache
        full by what no request of ours holds) is refused rather than kept waiting for nothing."""
        while self.held:
            rid, submit = next(iter(self.held.items()))
            outcome = self._route(submit)
            if outcome is None or (isinstance(outcome, _Refusal) and outcome.status == 429 and self.inflight):
                return
            del self.held[rid]
            QUEUED.set(len(self.held))
            if isinstance(outcome, _Refusal):
                await self._fail(submit.token_subject, rid, outcome.error)
            else:
                self._start(submit, outcome, None)

    async def keep_held_alive(self) -> None:
        """Tell the gateways of held requests that they wait (`common.keepalive`): a wait behind
        long outputs outlasts the gateway's token timeout, at the index of their next token."""
        if self.held:
            waiting = ((rid, len(submit.output_token_ids)) for rid, submit in self.held.items())
            await self.keepalive.tick(waiting, lambda rid: self.held[rid].token_subject)

    def _start(self, submit: SubmitRequest, route: _Route, reply: Reply | None) -> None:
        """Remember the request as routed and hand it to its prefill instance (a task of its own)."""
        rid = submit.request_id
        executor = route.executor
        task = PrefillTask(
            submit,
            route.decode.instance_id,
            route.decode.ucx_address,
            executor.instance_id if executor else "",
            executor.ucx_address if executor else b"",
        )
        self.inflight[rid] = _InFlight(
            route.prefill.instance_id,
            route.decode.instance_id,
            submit.token_subject,
            route.need,
            len(submit.prompt_token_ids),
            route.max_tokens,
            executor.instance_id if executor else "",
            generated=len(submit.output_token_ids),
        )
        self.routed += 1  # counted when decided: the next request's decision may come before this ack
        if self.settings.fixed_ratio is None:  # the decision that placed it (a held request's last)
            DECISIONS.labels(str(executor is not None).lower(), route.why).inc()
        dispatch = asyncio.create_task(self._dispatch(task, route, reply))
        self.dispatches.add(dispatch)
        dispatch.add_done_callback(self.dispatches.discard)

    async def _dispatch(self, task: PrefillTask, route: _Route, reply: Reply | None) -> None:
        """Hand a routed request to its prefill instance and answer the gateway (`reply`; None: a
        held request, answered already, which hears of a failure on its token subject). A task of
        its own: NATS runs one subscription's callbacks one at a time, so awaiting the prefill's ack
        inside `on_submit` admitted a burst of requests one round trip at a time."""
        rid = task.request.request_id
        prefill = route.prefill
        try:
            ack = await self.bus.request(
                self.subjects.instance(prefill.instance_id, "prefill"), task, Ack, self.settings.request_timeout_s
            )
        except ServiceUnavailable as exc:
            ack = Ack(False, str(exc))
            status = 503
        else:
            status = 400
        if not ack.accepted:
            self.inflight.pop(rid, None)
            self.routed -= 1
            if reply is None:
                await self._fail(task.request.token_subject, rid, ack.error)
            else:
                await self._refuse(reply, rid, status, ack.error)
            return
        log.info(
            "routed",
            request_id=rid,
            prefill_id=prefill.instance_id,
            decode_id=task.decode_id,
            executor_id=task.executor_id,
            offload=route.why,
        )
        if reply is not None:
            SUBMISSIONS.labels("200").inc()
            offloaded = route.executor is not None
            await reply(SubmitReply(rid, True, 200, "", prefill.instance_id, task.decode_id, offloaded))

    async def _fail(self, token_subject: str, request_id: str, error: str) -> None:
        """End an accepted request that holds nothing anywhere: its gateway hears the error."""
        log.info("failed", request_id=request_id, error=error)
        event = TokenEvent(request_id, [], finish_reason="error", error=error)
        await self.bus.publish(token_subject, TokenBatch([event]))

    def _offload_target(
        self, prefill: InstanceLoad, decode: InstanceLoad, decodes: list[InstanceLoad], prompt: int, max_tokens: int
    ) -> tuple[InstanceLoad | None, str, bool]:
        """The executor beside `prefill` if this request is to be offloaded (else None), why, and
        whether a request kept local should wait here for room rather than on `decode`.

        Fixed ratio: request k (counting every routed request) is offloaded when
        floor((k + 1) * ratio) > floor(k * ratio), so exactly `ratio` of them are, spread evenly,
        as long as the executor has room. Auto: `policy.decide`, for the decode instance that
        would otherwise take it.

        Waiting here: when the auto policy keeps the request local while the decode instance is
        under memory pressure (`policy.under_pressure`). There it would wait for room, or be
        preempted, and stay there even once an executor has room, where the policy may offload it
        when it is decided again (under a burst, the executor emptied while requests queued on the
        decode instance: 1.34x of plain PD with 32 requests on the memory-bound benchmark). Only
        while something in flight on that decode instance will end and free room; only for the
        auto policy (plain PD and fixed ratios route at once, as the paper's baselines do); never
        with no executor (nothing else could take it).
        """
        beside = [e for e in self.live("executor") if e.colocated_with == prefill.instance_id]
        executor = max(beside, key=self._free_tokens, default=None)
        ratio = self.settings.fixed_ratio
        if ratio is not None:
            if math.floor((self.routed + 1) * ratio) <= math.floor(self.routed * ratio):
                return None, "fixed_ratio", False
            if executor is None or self._free_tokens(executor) < self._executor_need(executor, prompt):
                return None, "executor_full", False
            return executor, "fixed_ratio", False
        slo_s = self.settings.tpot_slo_ms / 1e3
        books = self._books(decode.instance_id)
        # B_tpot at the lengths the batch will have over its coming steps (with this request)
        batch = books.local_batch + books.offloaded_batch
        mean_len = (books.coming_tokens + policy.coming_length(prompt, max_tokens)) / (batch + 1)
        bound = policy.bounds(decode, decodes, self.live("executor"), mean_len, slo_s)
        if bound is not None:
            for name, value in dataclasses.asdict(bound).items():
                OFFLOAD_BOUND.labels(name).set(value)
        decode_free = self._free_tokens(decode)
        decision = policy.decide(
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            decode=decode,
            decode_free_tokens=decode_free,
            books=books,
            executor_free_tokens=self._free_tokens(executor) if executor is not None else None,
            executor_need_tokens=self._executor_need(executor, prompt) if executor is not None else 0,
            bound=bound,
            slo_s=slo_s,
        )
        if decision.offload:
            return executor, decision.reason, False
        hold = (
            decision.reason != "no_executor"
            and self.settings.max_queued_requests > 0
            and batch > 0
            and policy.under_pressure(decode, decode_free, books, prompt, max_tokens)
        )
        return None, decision.reason, hold

    def _books(self, decode_id: str) -> policy.Books:
        books = policy.Books()
        for f in self.inflight.values():
            if f.decode_id != decode_id:
                continue
            length = f.prompt_tokens + f.generated
            if f.executor_id:
                books.offloaded_batch += 1
                books.offloaded_tokens += length
                books.offloaded_coming_tokens += policy.coming_length(length, f.max_tokens)
                books.offloaded_spans.append((length, f.max_tokens))
            else:
                books.local_batch += 1
                books.local_tokens += length
                books.local_coming_tokens += policy.coming_length(length, f.max_tokens)
                books.local_spans.append((length, f.max_tokens))
        return books

    async def _refuse(self, reply: Reply, request_id: str, status: int, error: str) -> None:
        log.info("refused", request_id=request_id, status=status, error=error)
        SUBMISSIONS.labels(str(status)).inc()
        await reply(SubmitReply(request_id, False, status, error))

    async def on_admitted(self, admitted: Admitted, reply: Reply | None) -> None:
        if admitted.request_id in self.inflight:
            entry = self.inflight[admitted.request_id]
            entry.admitted, entry.admitted_at = True, time.monotonic()
            if entry.executor_id and admitted.instance_id == entry.decode_id:
                entry.executor_id = ""  # its executor was full after all: the prefill handed it to decode
            await self.drain()

    async def on_resume(self, submit: SubmitRequest, reply: Reply | None) -> None:
        """A request whose KV was lost (its executor handed it back, full), with its output so far:
        placed again, recomputed on a prefill instance, ahead of every held request (it was placed
        before any of them). Every scheduler hears it; the one that routed it acts."""
        rid = submit.request_id
        if self.inflight.pop(rid, None) is None:  # ended, aborted, or another scheduler's
            return
        self.held = {rid: submit, **self.held}
        QUEUED.set(len(self.held))
        log.info("resumed", request_id=rid, generated=len(submit.output_token_ids))
        await self.drain()

    async def on_ended(self, ended: RequestsEnded, reply: Reply | None) -> None:
        """Requests that finished or failed on an instance: their places are free. (Gateways' aborts
        come as `AbortRequest`s, failures the scheduler saw itself are forgotten where seen.)"""
        freed = False
        for rid in ended.request_ids:
            freed |= self.inflight.pop(rid, None) is not None
        if freed:
            await self.drain()

    async def on_abort(self, abort: AbortRequest, reply: Reply | None) -> None:
        """Forget the request, and tell its gateway why: a service that fails a request (an
        executor whose KV transfer failed) may not write into gateways' token subjects itself
        (common/nats_auth.py). A gateway that aborted the request itself ignores the event."""
        flight = self.inflight.pop(abort.request_id, None)
        held = self.held.pop(abort.request_id, None)
        QUEUED.set(len(self.held))
        subject = flight.token_subject if flight is not None else held.token_subject if held is not None else ""
        if subject:
            event = TokenEvent(abort.request_id, [], finish_reason="error", error=abort.reason or "aborted")
            await self.bus.publish(subject, TokenBatch([event]))
        if flight is not None:
            await self.drain()

    async def on_status(self, request: StatusRequest, reply: Reply | None) -> None:
        if reply is not None:
            prefill = sorted(i.instance_id for i in self.live("prefill"))
            decode = sorted(i.instance_id for i in self.live("decode"))
            executor = sorted(i.instance_id for i in self.live("executor"))
            await reply(ClusterStatus(prefill, decode, len(self.inflight) + len(self.held), executor))

    async def serve(self, stop: asyncio.Event) -> None:
        s = self.subjects
        subs = [
            await self.bus.subscribe(s.load, InstanceLoad, self.on_load),
            await self.bus.subscribe(s.submit, SubmitRequest, self.on_submit, queue="scheduler"),
            await self.bus.subscribe(s.admitted, Admitted, self.on_admitted),
            await self.bus.subscribe(s.resume, SubmitRequest, self.on_resume),
            await self.bus.subscribe(s.ended, RequestsEnded, self.on_ended),
            await self.bus.subscribe(s.abort, AbortRequest, self.on_abort),
            await self.bus.subscribe(s.status, StatusRequest, self.on_status, queue="scheduler"),
            await self.bus.subscribe(s.gateway_heartbeat, GatewayHeartbeat, self.on_gateway_heartbeat),
        ]
        await self.hearing.start()
        log.info("scheduler ready")
        try:
            while not stop.is_set():
                await self.reap()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.dead_after_s / 4):  # cancellable, unlike wait_for
                        await stop.wait()
        finally:
            await self.hearing.stop()
            for sub in subs:
                await sub.unsubscribe()
            for dispatch in self.dispatches:
                dispatch.cancel()

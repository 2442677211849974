"""What every service process shares: its settings, signal handling, heartbeats, sampling conversion.

Heartbeats are plain NATS publishes rather than a JetStream key-value bucket with per-key TTL:
the load they carry changes every step, and the bucket's TTL has whole-second granularity
(nats-py sends `Nats-TTL` as an integer), while we want a dead instance noticed in about two
heartbeat intervals (1 s by default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import torch

from common import metrics
from common import settings_catalog as catalog
from common.bus import Bus
from common.config import EngineConfig
from common.engine import Engine, StepOutput
from common.health import HEALTH
from common.logging import configure
from common.messages import InstanceLoad, RequestsEnded, TokenBatch, TokenEvent
from common.request import PromptLogprobs
from common.settings import field, load_or_exit
from common.subjects import Subjects
from common.tensor_channel import TensorChannel
from common.watchdog import WorkClock, watch_loop

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class InstanceSettings(catalog.ControlPlaneSettings):
    """Settings of one prefill, decode or attention-executor instance (docs/settings.md)."""

    model: str = field(catalog.MODEL)
    instance_id: str = field(catalog.INSTANCE_ID)  # "" is filled in by `parse` (role-host-pid)
    kv_cache_bytes: int = field(catalog.KV_CACHE_BYTES)
    block_size: int = field(catalog.BLOCK_SIZE)
    max_num_seqs: int = field(catalog.MAX_NUM_SEQS)
    device: str = field(catalog.DEVICE)
    threads: int = field(catalog.THREADS)
    heartbeat_s: float = field(catalog.HEARTBEAT_S)
    dead_after_s: float = field(catalog.DEAD_AFTER_S)
    transfer_timeout_s: float = field(catalog.TRANSFER_TIMEOUT_S)
    metrics_host: str = field(catalog.METRICS_HOST)
    metrics_port: int = field(catalog.METRICS_PORT)
    colocated_with: str = field(catalog.COLOCATED_WITH)
    ucx_net_devices: str = field(catalog.UCX_NET_DEVICES)
    ucx_spin_us: float = field(catalog.UCX_SPIN_US)

    @classmethod
    def parse(cls, argv: list[str] | None, role: str) -> InstanceSettings:
        """From flags and ADRENALINE_* variables; a bad value exits with a message naming it."""
        settings: InstanceSettings = load_or_exit(cls, argv, f"python -m services.{role}")
        if not settings.instance_id:
            settings = dataclasses.replace(settings, instance_id=f"{role}-{socket.gethostname()}-{os.getpid()}")
        return settings

    def apply_threads(self) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)


async def step(engine: Engine, thread: Executor | None = None) -> list[StepOutput]:
    """One engine step in a worker thread (so NATS and UCX keep being served), timed; in `thread`
    when the step must always run on the same one (its own UCX worker: services.decode.step_channel)."""
    batch = len(engine.running) or len(engine.waiting)
    preemptions = engine.num_preemptions
    start = time.perf_counter()
    STEP_CLOCK.since = time.monotonic()
    try:
        outputs = await asyncio.get_running_loop().run_in_executor(thread, engine.step)
    finally:
        STEP_CLOCK.since = 0.0
    metrics.STEP_SECONDS.observe(time.perf_counter() - start)
    metrics.BATCH_SIZE.observe(batch)
    metrics.PREEMPTIONS.inc(engine.num_preemptions - preemptions)
    return outputs


class Tombstones:
    """Request ids aborted recently, so that work for them arriving after the abort is refused.

    An abort can overtake the request itself: a client that hangs up while its prompt is being
    handed from prefill to decode sends the abort to everyone, and the decode instance may hear it
    before the hand-off. Without this, the hand-off would then be admitted and run to its end.

    Bounded in time and size, and O(1) per abort: ids expire after `ttl_s` (dropped from the
    oldest end as new ones come), and past `max_ids` the oldest go first, so no storm of aborts
    can make one cost more or hold more memory.
    """

    def __init__(self, ttl_s: float = 120.0, max_ids: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_ids = max_ids
        self._ids: OrderedDict[str, float] = OrderedDict()  # oldest first

    def add(self, request_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._ids[request_id] = now
        self._ids.move_to_end(request_id)
        while self._ids:
            oldest, added = next(iter(self._ids.items()))
            if now - added < self.ttl_s and len(self._ids) <= self.max_ids:
                break
            del self._ids[oldest]

    def __contains__(self, request_id: object) -> bool:
        added = self._ids.get(request_id) if isinstance(request_id, str) else None
        return added is not None and time.monotonic() - added < self.ttl_s

    def __len__(self) -> int:
        return len(self._ids)


def waiting_at(engine: Engine) -> Iterator[tuple[str, int]]:
    """(request id, next output index) of each request waiting on `engine` for a step: what
    `common.keepalive.KeepAlive` keeps alive at their gateways between steps."""
    return ((r.request_id, len(r.output_token_ids)) for r in engine.waiting)


def build_engine(settings: InstanceSettings) -> Engine:
    config = EngineConfig(
        block_size=settings.block_size,
        kv_cache_bytes=settings.kv_cache_bytes,
        max_num_seqs=settings.max_num_seqs,
        device=settings.device,
    )
    return Engine.from_folder(settings.model, config)


def token_event(out: StepOutput) -> TokenEvent:
    """One engine step's output for one request, as the gateway receives it."""
    return TokenEvent(
        out.request_id,
        [out.token_id],
        [out.logprob] if out.logprob is not None else [],
        [out.top_logprobs] if out.top_logprobs is not None else [],
        str(out.finish_reason) if out.finish_reason is not None else None,
        first_index=out.index,
    )


async def publish_events(bus: Bus, subjects: Subjects, events: Mapping[str, list[TokenEvent]]) -> None:
    """Send each gateway (token subject) its batch, then tell the scheduler, in one message, which
    requests ended in them. Prefill and decode send every token event through here: this is how
    the scheduler learns that a request's place is free, without reading the token streams."""
    ended: list[str] = []
    for subject, batch in events.items():
        await bus.publish(subject, TokenBatch(batch))
        ended.extend(event.request_id for event in batch if event.finish_reason is not None)
    if ended:
        await bus.publish(subjects.ended, RequestsEnded(ended))


PROMPT_LOGPROB_VALUES = 16_384  # logprobs (each with its token id) per event: about 250 KB, well under NATS's 1 MB


def prompt_logprob_events(request_id: str, prompt: PromptLogprobs) -> list[TokenEvent]:
    """A request's prompt logprobs as events of their own, in prompt order, each small enough for one
    NATS message whatever the prompt's length (the first token's event follows them)."""
    per_position = 1 + max((len(row) for row in prompt.top), default=0)
    size = max(1, PROMPT_LOGPROB_VALUES // per_position)
    return [
        TokenEvent(
            request_id, [], prompt_logprobs=prompt.logprobs[i : i + size], prompt_top_logprobs=prompt.top[i : i + size]
        )
        for i in range(0, len(prompt.logprobs), size)
    ]


async def wait_for_work(wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Sleep until there is work (`wake`) or the service is stopping."""
    waiter = asyncio.create_task(wake.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    stopper.cancel()
    wake.clear()


async def heartbeat(bus: Bus, subjects: Subjects, load: Callable[[], InstanceLoad], interval: float) -> None:
    """Publish this instance's load every `interval` seconds until cancelled; mirror it in the gauges."""
    while True:
        try:
            current = dataclasses.replace(load(), sent_at=time.time())
            metrics.observe_pool(
                current.role, current.total_blocks, current.free_blocks, current.running, current.waiting
            )
            start = time.monotonic()
            await bus.publish(subjects.load_of(current.role), current)
            if (took := time.monotonic() - start) > interval:  # NATS pushing back: peers may judge us gone
                log.warning("heartbeat publish slow", seconds=round(took, 2))
            if bus.client.is_connected:
                HEALTH.ok()
            else:
                HEALTH.not_ok("not connected to NATS")
        except Exception as exc:  # a reconnecting NATS client must not kill the instance
            HEALTH.not_ok(f"heartbeat failed: {exc}")
            log.warning("heartbeat failed", error=str(exc))
        await asyncio.sleep(interval)


def engine_load(settings: InstanceSettings, role: str, engine: Engine, address: bytes, queued: int) -> InstanceLoad:
    """The heartbeat of an engine-backed instance; `queued` counts work not yet in the engine."""
    blocks = engine.blocks
    return InstanceLoad(
        instance_id=settings.instance_id,
        role=role,
        ucx_address=address,
        block_size=blocks.block_size,
        total_blocks=blocks.num_blocks,
        free_blocks=blocks.num_free_blocks,
        running=len(engine.running),
        waiting=len(engine.waiting) + queued,
        waiting_tokens=sum(r.num_tokens for r in engine.waiting),
    )


async def connect(settings: InstanceSettings) -> tuple[Bus, TensorChannel]:
    """An instance's NATS connection (as its role's user) and its UCX worker (on its devices)."""
    bus = await Bus.connect(settings.nats_url, settings.instance_id, settings.nats)
    try:
        channel = await TensorChannel.create(settings.ucx_net_devices, settings.ucx_spin_us)
    except BaseException:
        await bus.close()
        raise
    return bus, channel


class EngineService(Protocol):
    async def serve(self, stop: asyncio.Event) -> None: ...


def run_engine_instance(
    argv: list[str] | None,
    role: str,
    make_service: Callable[[InstanceSettings, Engine, Bus, TensorChannel], EngineService],
) -> None:
    """`python -m services.<role>` for prefill and decode: settings, logging, model, metrics, then serve."""
    settings = InstanceSettings.parse(argv, role)
    configure(role, settings.log_level).bind(instance_id=settings.instance_id)
    settings.apply_threads()
    engine = build_engine(settings)
    metrics.name_model(settings.model)
    metrics.serve(settings.metrics_port, settings.metrics_host)

    async def serve(stop: asyncio.Event) -> None:
        bus, channel = await connect(settings)
        try:
            await make_service(settings, engine, bus, channel).serve(stop)
        finally:
            await bus.close()
            await channel.close()

    run_until_signalled(serve)


STEP_CLOCK = WorkClock()  # the engine step now running in its thread, for `watch_loop`


def run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], grace_s: float = 4.0) -> None:
    """Run `main(stop)` where `stop` is set on SIGINT or SIGTERM, so the service can shut down cleanly.

    The clean shutdown is bounded, because what it waits on may never come (a NATS drain to a
    server that is gone, a step or a transfer that hangs): if `main` is still running `grace_s`
    after the first signal, or when a second one comes, the process exits there and then with
    128 + the signal's number, as a shell reports a death by that signal. `adrenaline up` gives
    its services a little longer than `grace_s` before it resorts to SIGKILL.
    """
    from common.lifetime import exit_after, exit_now

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                log.warning("second signal: exiting now", signal=sig.name)
                exit_now(128 + sig)
            log.info("stopping", signal=sig.name)
            stop.set()
            exit_after(grace_s, 128 + sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        watchdog = asyncio.create_task(watch_loop(STEP_CLOCK))
        try:
            await main(stop)
        finally:
            watchdog.cancel()

    asyncio.run(runner())

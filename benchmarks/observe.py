"""What the benchmark hears from the cluster itself: its heartbeats during a run, its metrics after.

Nothing extra is asked of the instances: the benchmark joins NATS as the read-only observer user
and listens to the heartbeats they send anyway, and scrapes the Prometheus endpoints they serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from benchmarks.workload import Record, Request, run_workload

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription

    from common.bus import Bus
    from common.subjects import Subjects
    from services.local_cluster import LocalCluster

HEARTBEAT_S = 0.25  # the instances' heartbeat interval (ADRENALINE_HEARTBEAT_S's default)


class ClusterSampler:
    """Records what the cluster says about itself while the workload runs, for the timeline plot.

    It joins the cluster's NATS as one more listener, as `adrenaline status` does: every
    instance's `InstanceLoad` heartbeat (every 0.25 s; a decode instance's `running` is its
    batch, an executor's the offloaded requests it holds) and, once a second, the scheduler's
    `ClusterStatus` (requests in flight). The heartbeats are sent anyway, so listening costs the
    cluster nothing; the status request is one small message a second. Times are
    `time.perf_counter()` values, made relative to the workload's start by `timeline`.
    """

    def __init__(self, bus: Bus, subjects: Subjects, status_every_s: float = 1.0) -> None:
        self.bus = bus
        self.subjects = subjects
        self.status_every_s = status_every_s
        self.loads: list[dict[str, Any]] = []
        self.inflight: list[tuple[float, int]] = []
        self.subscription: Subscription | None = None
        self.poller: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, connect: Callable[[], Awaitable[Bus]], prefix: str) -> ClusterSampler:
        from common.messages import InstanceLoad
        from common.subjects import Subjects

        sampler = cls(await connect(), Subjects(prefix))

        async def on_load(load: InstanceLoad, reply: object) -> None:
            sampler.loads.append(
                {
                    "t": time.perf_counter(),
                    "instance": load.instance_id,
                    "role": load.role,
                    "running": load.running,
                    "waiting": load.waiting,
                    "kv_used": load.total_blocks - load.free_blocks,
                    "kv_total": load.total_blocks,
                }
            )

        sampler.subscription = await sampler.bus.subscribe(sampler.subjects.load, InstanceLoad, on_load)
        sampler.poller = asyncio.create_task(sampler._poll_status())
        return sampler

    async def _poll_status(self) -> None:
        from common.bus import ServiceUnavailable
        from common.messages import ClusterStatus, StatusRequest

        while True:
            try:
                status = await self.bus.request(self.subjects.status, StatusRequest(), ClusterStatus, 1.0)
                self.inflight.append((time.perf_counter(), status.inflight))
            except ServiceUnavailable:  # a busy or restarting scheduler: a gap in the line, not a failure
                pass
            await asyncio.sleep(self.status_every_s)

    async def settle(self) -> None:
        """Wait, at most two heartbeat intervals, for a decode heartbeat sent after now: the
        timeline then ends where the run does, and a run shorter than one interval still has one."""
        since = time.perf_counter()
        deadline = since + 2 * HEARTBEAT_S
        while time.perf_counter() < deadline:
            if any(b["role"] == "decode" and b["t"] > since for b in self.loads):
                return
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        if self.subscription is not None:
            await self.subscription.unsubscribe()
        await self.bus.close()

    def timeline(self, t0: float) -> dict[str, list[dict[str, Any]]]:
        """The samples with times in seconds from `t0` (the workload's start), as stored in the JSON."""
        return {
            "loads": [{**beat, "t": round(beat["t"] - t0, 4)} for beat in self.loads],
            "inflight": [{"t": round(t - t0, 4), "inflight": n} for t, n in self.inflight],
        }


async def measure(
    url: str, model: str, workload: list[Request], label: str, connect: Callable[[], Awaitable[Bus]], prefix: str
) -> tuple[list[Record], float, dict[str, list[dict[str, Any]]]]:
    """Run the workload with a `ClusterSampler` listening; returns the records, wall time and
    timeline. A sampler that cannot join NATS costs the run its timeline, not its figures."""
    try:
        sampler: ClusterSampler | None = await ClusterSampler.start(connect, prefix)
    except Exception as exc:
        print(f"warning: not listening to the cluster, no timeline for {label}: {exc}", file=sys.stderr)
        sampler = None
    try:
        records, t0, wall = await run_workload(url, model, workload, label)
        if sampler is not None:
            await sampler.settle()
    finally:
        if sampler is not None:
            await sampler.stop()
    return records, wall, sampler.timeline(t0) if sampler is not None else {"loads": [], "inflight": []}


def observer(cluster: LocalCluster) -> Callable[[], Awaitable[Bus]]:
    """How the benchmark joins a cluster's NATS to listen: as its read-only observer user, which
    may request the scheduler's status and hear heartbeats, nothing else (common/nats_auth.py)."""
    from common import nats_auth
    from common.bus import Bus

    assert cluster.nats is not None, "the cluster is started"
    url, auth = cluster.nats.url, cluster.credentials(nats_auth.OBSERVER)
    return lambda: Bus.connect(url, "adrenaline-bench", auth)


def decode_timeline(timeline: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Decode batch size and offloaded share over time, one point per decode heartbeat.

    At each decode heartbeat the batch is the sum of every decode instance's latest `running`,
    and the offloaded share the executors' latest `running` (the offloaded requests they hold)
    over that batch. The two come from different heartbeats, up to one beat apart, so the share
    is clamped to 1 and undefined (NaN, a gap in the plot) while the batch is empty.
    """
    latest: dict[str, dict[str, Any]] = {}
    out: dict[str, list[float]] = {"t": [], "batch": [], "offloaded": [], "offloaded_share": []}
    for beat in sorted(timeline.get("loads", []), key=lambda b: float(b["t"])):
        latest[beat["instance"]] = beat
        if beat["role"] != "decode":
            continue
        batch = sum(b["running"] for b in latest.values() if b["role"] == "decode")
        offloaded = sum(b["running"] for b in latest.values() if b["role"] == "executor")
        out["t"].append(float(beat["t"]))
        out["batch"].append(float(batch))
        out["offloaded"].append(float(min(offloaded, batch)))
        out["offloaded_share"].append(min(1.0, offloaded / batch) if batch else math.nan)
    return out


def scrape(ports: dict[str, int], role: str) -> dict[str, float]:
    """Sum the samples of every instance of `role` (by instance-id prefix) per sample name."""
    from common.metrics import scrape_metrics

    totals: dict[str, float] = {}
    for name, port in ports.items():
        if name.startswith(role):
            for key, value in scrape_metrics(port).items():
                totals[key] = totals.get(key, 0.0) + value
    return totals


def decode_summary(m: dict[str, float], executors: dict[str, float], wall: float) -> dict[str, float]:
    def mean(name: str) -> float:
        count = m.get(f"{name}_count", 0.0)
        return m.get(f"{name}_sum", 0.0) / count if count else math.nan

    def executor_mean(name: str) -> float:  # an executor's busy time per step it served
        count = executors.get(f"{name}_count", 0.0)
        return executors.get(f"{name}_sum", 0.0) / count if count else math.nan

    local = m.get('adrenaline_decode_rows_total{attention="local"}', 0.0)
    offloaded = m.get('adrenaline_decode_rows_total{attention="offloaded"}', 0.0)
    return {
        "mean_batch_size": mean("adrenaline_batch_size"),
        "offloaded_share": offloaded / (local + offloaded) if local + offloaded else math.nan,
        "round_trip_ms": 1e3 * mean("adrenaline_offload_layer_round_trip_seconds"),
        "local_attention_ms": 1e3 * mean("adrenaline_offload_local_attention_seconds"),
        "stall_ms": 1e3 * mean("adrenaline_offload_stall_seconds"),
        "step_ms": 1e3 * mean("adrenaline_step_seconds"),
        "executor_step_ms": 1e3 * executor_mean("adrenaline_executor_step_seconds"),
        # requests whose KV was dropped (decode preemptions, executor hand-backs) or that found no
        # room on arrival: each recomputes its context on the decode instance, but the hand-backs
        # resumed elsewhere (recomputed on a prefill instance: `resumed`)
        "recomputed": m.get("adrenaline_preemptions_total", 0.0)
        + m.get("adrenaline_decode_handoffs_recomputed_total", 0.0)
        - m.get("adrenaline_decode_resumed_total", 0.0),
        "resumed": m.get("adrenaline_decode_resumed_total", 0.0),
        "executor_gb_s": executors.get("adrenaline_executor_attention_bytes_total", 0.0) / wall / 1e9,
    }


def kv_left(ports: dict[str, int], wait_s: float = 5.0) -> int:
    """KV blocks still held on any prefill, decode or executor instance once the workload is over
    (0 is the only right answer); the gauges follow heartbeats, so give them a moment."""
    from common.metrics import scrape_metrics

    deadline = time.monotonic() + wait_s
    while True:
        used = sum(
            int(scrape_metrics(port).get("adrenaline_kv_blocks_used", 0.0))
            for name, port in ports.items()
            if name.startswith(("prefill", "decode", "executor"))
        )
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.25)

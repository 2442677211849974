"""`adrenaline status`: what a running cluster is doing, read from the cluster itself.

It joins the cluster's NATS as one more listener: the scheduler says which instances are live
and how many requests are in flight (`StatusRequest`), and the instances' own heartbeats
(`InstanceLoad`, every 0.25 s) say how full each KV pool is, what runs and what waits. Nothing
is asked of the instances, so watching a cluster costs it nothing but the heartbeats it sends
anyway. `--watch` redraws every second on a terminal; elsewhere one snapshot is printed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

from common.bus import Bus, NatsAuth, Reply, ServiceUnavailable
from common.messages import ClusterStatus, InstanceLoad, StatusRequest
from common.subjects import Subjects

ROLE_ORDER = ("prefill", "executor", "decode")


@dataclass
class ClusterView:
    status: ClusterStatus | None  # None: no scheduler answered
    loads: dict[str, InstanceLoad] = field(default_factory=dict)  # by instance id, the latest heartbeat
    taken_at: float = field(default_factory=time.time)


async def snapshot(bus: Bus, subjects: Subjects, listen_s: float = 0.6) -> ClusterView:
    """The scheduler's view and every heartbeat heard within `listen_s` (a little over two beats)."""
    loads: dict[str, InstanceLoad] = {}

    async def on_load(load: InstanceLoad, reply: Reply | None) -> None:
        loads[load.instance_id] = load

    subscription = await bus.subscribe(subjects.load, InstanceLoad, on_load)
    try:
        try:
            status: ClusterStatus | None = await bus.request(subjects.status, StatusRequest(), ClusterStatus, 2.0)
        except ServiceUnavailable:
            status = None
        await asyncio.sleep(listen_s)
    finally:
        await subscription.unsubscribe()
    return ClusterView(status, loads)


def render(view: ClusterView) -> str:
    """A plain-text table: one line per instance, grouped by role."""
    when = time.strftime("%H:%M:%S", time.localtime(view.taken_at))
    if view.status is None:
        head = f"{when}  no scheduler answered: the cluster cannot take requests"
    else:
        s = view.status
        head = (
            f"{when}  in flight {s.inflight}  |  prefill {len(s.prefill)}, decode {len(s.decode)}, "
            f"executor {len(s.executor)} live (the scheduler's view)"
        )
    lines = [head, f"{'role':<9} {'instance':<24} {'KV used':>16} {'running':>8} {'waiting':>8}  notes"]
    for load in sorted(view.loads.values(), key=lambda x: (ROLE_ORDER.index(x.role), x.instance_id)):
        used = load.total_blocks - load.free_blocks
        share = used / load.total_blocks if load.total_blocks else 0.0
        kv = f"{used}/{load.total_blocks} {share:4.0%}"
        notes = []
        if load.colocated_with:
            notes.append(f"beside {load.colocated_with}")
        if load.waiting_tokens:
            notes.append(f"{load.waiting_tokens} KV tokens queued")
        if load.offload_stall_s is not None:
            notes.append(f"executor wait {1e3 * load.offload_stall_s:.1f} ms/step")
        if view.status is not None and load.instance_id not in _live(view.status):
            notes.append("NOT LIVE for the scheduler")
        lines.append(
            f"{load.role:<9} {load.instance_id:<24} {kv:>16} {load.running:>8} {load.waiting:>8}  {', '.join(notes)}"
        )
    if not view.loads:
        lines.append("(no heartbeats heard: no instance is up, or another subject prefix is in use)")
    return "\n".join(lines)


def _live(status: ClusterStatus) -> set[str]:
    return {*status.prefill, *status.decode, *status.executor}


async def run(nats_url: str, prefix: str, watch: bool, auth: NatsAuth | None = None) -> int:
    bus = await Bus.connect(nats_url, "adrenaline-status", auth)
    subjects = Subjects(prefix)
    try:
        while True:
            view = await snapshot(bus, subjects)
            text = render(view)
            if watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # home, clear: redraw in place
                sys.stdout.flush()
                await asyncio.sleep(0.4)
                continue
            print(text)
            return 0 if view.status is not None else 1
    finally:
        await bus.close()

"""A real cluster for tests: nats-server plus each service as its own process, and a NATS client.

`BackendCluster` starts scheduler, prefill and decode instances (no gateway) so that the
services can be tested over their own messages; the gateway's tests add it on top.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from common.bus import Bus, Reply
from common.messages import (
    ClusterStatus,
    InstanceLoad,
    Sampling,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
)
from common.metrics import scrape_metrics
from common.natsd import NatsServer, free_port
from common.subjects import Subjects
from services.launcher import ProcessGroup

PREFIX = "test"


@dataclass
class BackendCluster:
    model: Path
    log_dir: Path
    prefills: int = 1
    decodes: int = 1
    decode_kv_bytes: int = 64 * 2**20
    executors: bool = False  # an attention executor beside each prefill instance
    executor_kv_bytes: int = 32 * 2**20
    offload_ratio: str | float = 0.0  # "auto" or a fixed share
    extra_env: dict[str, str] = field(default_factory=dict)  # more ADRENALINE_* for every service
    nats: NatsServer = field(default_factory=NatsServer)
    group: ProcessGroup = field(init=False)

    def __post_init__(self) -> None:
        self.group = ProcessGroup(self.log_dir)
        self.metrics_ports: dict[str, int] = {}

    def env(self, instance_id: str, kv_bytes: int) -> dict[str, str]:
        self.metrics_ports[instance_id] = free_port()
        return {
            "ADRENALINE_METRICS_PORT": str(self.metrics_ports[instance_id]),
            "ADRENALINE_NATS_URL": self.nats.url,
            "ADRENALINE_MODEL": str(self.model),
            "ADRENALINE_INSTANCE_ID": instance_id,
            "ADRENALINE_SUBJECTS_PREFIX": PREFIX,
            "ADRENALINE_KV_CACHE_BYTES": str(kv_bytes),
            "ADRENALINE_THREADS": "1",
            "ADRENALINE_TRANSFER_TIMEOUT_S": "5",
            **self.extra_env,
        }

    def start(self) -> None:
        scheduler_env = {**self.env("scheduler", 0), "ADRENALINE_OFFLOAD_RATIO": str(self.offload_ratio)}
        self.group.spawn("scheduler", "services.scheduler", env=scheduler_env)
        for i in range(self.prefills):
            self.group.spawn(f"prefill-{i}", "services.prefill", env=self.env(f"prefill-{i}", 16 * 2**20))
            if self.executors:
                env = {**self.env(f"executor-{i}", self.executor_kv_bytes), "ADRENALINE_COLOCATED_WITH": f"prefill-{i}"}
                self.group.spawn(f"executor-{i}", "services.attention_executor", env=env)
        for i in range(self.decodes):
            self.group.spawn(f"decode-{i}", "services.decode", env=self.env(f"decode-{i}", self.decode_kv_bytes))

    def metrics(self, instance_id: str) -> dict[str, float]:
        return scrape_metrics(self.metrics_ports[instance_id])

    def stop(self) -> None:
        self.group.stop()
        self.nats.stop()


class Client:
    """Plays the gateway's part over NATS: submits requests and collects their token events."""

    def __init__(self, bus: Bus, gateway_id: str = "gw-test") -> None:
        self.bus = bus
        self.subjects = Subjects(PREFIX)
        self.token_subject = self.subjects.tokens(gateway_id)
        self.events: dict[str, list[TokenEvent]] = defaultdict(list)
        self.done: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.loads: dict[str, InstanceLoad] = {}

    @classmethod
    async def connect(cls, url: str) -> Client:
        client = cls(await Bus.connect(url, "test-client"))
        await client.bus.subscribe(client.token_subject, TokenBatch, client._on_tokens)
        await client.bus.subscribe(client.subjects.load, InstanceLoad, client._on_load)
        return client

    async def _on_tokens(self, batch: TokenBatch, reply: Reply | None) -> None:
        for event in batch.events:
            self.events[event.request_id].append(event)
            if event.finish_reason is not None:
                self.done[event.request_id].set()

    async def _on_load(self, load: InstanceLoad, reply: Reply | None) -> None:
        self.loads[load.instance_id] = load

    async def wait_ready(self, prefills: int, decodes: int, executors: int = 0, timeout: float = 60.0) -> ClusterStatus:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = await self.bus.request(self.subjects.status, StatusRequest(), ClusterStatus, 1.0)
                if (len(status.prefill), len(status.decode), len(status.executor)) == (prefills, decodes, executors):
                    return status
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready after {timeout} s")
            await asyncio.sleep(0.2)

    async def wait_scheduler_idle(self, timeout: float = 30.0) -> None:
        """Until the scheduler has no request in flight: it has heard every end, which on a loaded
        machine can come after the instances' heartbeats already show the KV free."""
        deadline = time.monotonic() + timeout
        while (await self.bus.request(self.subjects.status, StatusRequest(), ClusterStatus, 5.0)).inflight:
            if time.monotonic() > deadline:
                raise AssertionError(f"the scheduler still had requests in flight after {timeout} s")
            await asyncio.sleep(0.05)

    async def submit(self, request_id: str, prompt: list[int], sampling: Sampling) -> SubmitReply:
        submit = SubmitRequest(request_id, prompt, sampling, self.token_subject)
        return await self.bus.request(self.subjects.submit, submit, SubmitReply, 10.0)

    async def submit_retrying(self, request_id: str, prompt: list[int], sampling: Sampling) -> SubmitReply:
        """Submit, and while the cluster answers 429 (every decode KV full now), retry as a client would."""
        while True:
            reply = await self.submit(request_id, prompt, sampling)
            if reply.status != 429:
                return reply
            await asyncio.sleep(0.05)

    async def result(self, request_id: str, timeout: float = 60.0) -> tuple[list[int], TokenEvent]:
        await asyncio.wait_for(self.done[request_id].wait(), timeout)
        events = self.events[request_id]
        return [t for e in events for t in e.token_ids], events[-1]

    async def wait_all_free(self, instance_ids: list[str], timeout: float = 10.0) -> None:
        """Until a fresh heartbeat from each instance reports every KV block free and nothing running."""
        self.loads.clear()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loads = [self.loads.get(i) for i in instance_ids]
            if all(x is not None and x.free_blocks == x.total_blocks and x.running == 0 for x in loads):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"KV not back to free: {self.loads}")

"""Faults under load: every process of a supervised cluster killed, or paused, while streams run.

One `LocalCluster` (2 prefill instances with their executors, 2 decode instances, offload ratio
0.5, so that each fault has instances it does not touch) serves the whole module, supervised as
`adrenaline up` supervises it: `Supervisor` and `NatsKeeper` polled from this (the main)
thread, which must outlive the processes they start (`common.lifetime.die_with_parent`). Each case
runs concurrent streams through the official openai client, in two waves (the first decoding,
the second just submitted, so a fault meets requests in every phase), then:

- kill: SIGKILL of the gateway, the scheduler, prefill-0, decode-0, executor-0 or nats-server;
- pause: SIGSTOP of the same for `PAUSE_S` (three times `dead_after_s`), then SIGCONT,

and holds the cluster to what docs/services.md ("Failures") states:

- every request ends within `REQUEST_BOUND_S` of its start, completed or with a clean error
  (an `openai.APIError`, or the connection dropped by a killed gateway): none hangs;
- a request that the scheduler routed away from the faulted instance completes, and with the
  text it would have had without the fault; after a pause of the gateway, the scheduler or
  nats-server every request completes (liveness is judged with hysteresis, `common.liveness`);
  pausing an instance for three times `dead_after_s` is indistinguishable from its death, so
  its own requests may fail, cleanly;
- KV returns to zero on every instance, the restarted one included;
- a killed process is restarted by the supervisor, the cluster lists it again, and it serves:
  greedy output equal to `transformers`, with the restarted instance's own transfer counters
  showing that it took part;
- a killed gateway's requests are aborted in the backends (its restart, under the same id,
  hears their tokens and stops them, or the scheduler does when the gateway's heartbeats stop
  for longer than its restart takes): KV is free long before the requests could have run out.

Core NATS delivers at most once, so a `TokenBatch` in flight when the server dies (or published
by an instance that reconnects before the gateway has resubscribed) is lost. Token events carry
their position in the output (`TokenEvent.first_index`), so the gateway fails such a request
cleanly (502) instead of completing it with a token missing, which this module's nats-server
kill checks like every other case: a completed stream has every token.

The cases share the cluster, in an order that leaves it whole before the next one: pauses first,
then kills. Wall-clock bounds here are the stated bounds of failure handling, set well above what
they take (tests never measure speed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from common.metrics import scrape_metrics
from common.model.tiny import make_tiny
from common.natsd import free_port
from services.launcher import Child
from services.local_cluster import LocalCluster, healthy
from services.supervisor import RestartBudget, Supervisor
from services.up import NatsKeeper
from tests.e2e.helpers import greedy_completions, transformers_texts

PAUSE_S = 3.0  # three times dead_after_s: long enough to be judged dead, unless judged with hysteresis
WAVE = 6  # streams per wave; two waves
MAX_TOKENS = 1000  # per stream (ignore_eos): about 10 s here, so that every fault lands mid-stream
# A killed gateway's streams: far longer than its restart (whose new process aborts them, about 6 s
# here) on any machine, so that how much of them was decoded shows whether they were stopped. Decode
# and a restart are both CPU-bound, so a slower machine stretches both; the margin is the ratio of
# their lengths (about 4x here: 6000 tokens take 25 s, when 1900 took 7 s, too close to a restart).
GATEWAY_MAX_TOKENS = 6000
MODEL_POSITIONS = 8192  # this module's model: room for GATEWAY_MAX_TOKENS (the shared one has 2048)
TOKEN_TIMEOUT_S = 15.0  # the gateway's: a stream whose tokens stop fails (504) this long after the last
# No request outlives this from its start: its own decode time, a restart's detection (dead_after_s)
# and, at worst, a lost last token that only the gateway's token timeout ends.
REQUEST_BOUND_S = 75.0
RECOVERY_S = 120.0  # a restarted instance loads the model and profiles on a shared CPU
KV_FREE_S = 40.0  # a deferred abort waits out a KV transfer (transfer_timeout_s, 10 s) at most
GATEWAY_ABORT_S = 40.0  # a dead gateway's requests stopped in the backends (its restart included)
CHECK_PROMPTS = ("adrenaline attention batch", "block cache decode executor gateway", "kernel layer memory")
CHECK_TOKENS = 12
WORDS = ("adrenaline", "attention", "batch", "block", "cache", "decode", "executor", "gateway", "kernel", "layer")

TARGETS = {  # what a case faults: a process of the cluster, by its child name
    "gateway": "gateway-0",
    "scheduler": "scheduler-0",
    "prefill": "prefill-0",
    "decode": "decode-0",
    "executor": "executor-0",
    "nats-server": "nats-server",
}
FAULTS = [("pause", target) for target in TARGETS] + [("kill", target) for target in TARGETS]


class Supervision:
    """`adrenaline up`'s supervision (services/local_cluster.py `run_until_signalled`), driven by the test.

    Polled from the main thread only: a process is tied to the thread that started it
    (PR_SET_PDEATHSIG), so a supervisor thread that ended would take the processes it restarted
    with it.
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.said: list[str] = []
        self.orphans_seen: set[str] = set()  # requests a restarted gateway aborted, in earlier cases
        self.supervisor = Supervisor(cluster.group, say=self.said.append)
        self.nats = NatsKeeper(cluster, RestartBudget(self.supervisor.policy))

    def poll(self) -> None:
        self.supervisor.poll()
        self.nats.poll()
        assert not self.supervisor.given_up and not self.nats.given_up, self.said

    def until(self, check: Callable[[], bool], what: str, timeout: float) -> float:
        """Supervise until `check()` holds; the seconds it took, or fail at `timeout`."""
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not within {timeout} s: {what}; supervisor: {self.said}")
            self.poll()
            time.sleep(0.1)
        return time.monotonic() - start

    async def run(self) -> None:
        """The same, as a task beside the load (nats-server restarts block the loop for their start)."""
        while True:
            self.poll()
            await asyncio.sleep(0.1)


@dataclass
class Outcome:
    """One stream: what it returned, or how it failed, and how long it took."""

    wave: int
    prompt: str
    request_id: str = ""
    text: str = ""
    chunks: int = 0
    tokens: int = 0  # completion tokens, as the final usage chunk counts them
    error: BaseException | None = None
    seconds: float = 0.0
    done: bool = False


@dataclass(frozen=True)
class Route:
    prefill_id: str
    decode_id: str
    executor_id: str

    def touches(self, name: str) -> bool:
        return name in (self.prefill_id, self.decode_id, self.executor_id)


def _routes(cluster: LocalCluster) -> dict[str, Route]:
    """Where the scheduler sent each request (its "routed" log lines, every scheduler process's)."""
    assert cluster.log_dir is not None
    routes = {}
    for line in (cluster.log_dir / "scheduler-0.log").read_text(errors="replace").splitlines():
        if '"routed"' not in line:
            continue
        entry = json.loads(line)
        routes[entry["request_id"]] = Route(entry["prefill_id"], entry["decode_id"], entry.get("executor_id", ""))
    return routes


def _aborted_as_orphans(cluster: LocalCluster) -> set[str]:
    """Requests stopped because the gateway that took them died: aborted by its restart (an earlier
    process under its id had taken them) or by the scheduler (the gateway's heartbeats stopped for
    ADRENALINE_GATEWAY_DEAD_AFTER_S), whichever came first."""
    assert cluster.log_dir is not None
    aborted = set()
    for line in (cluster.log_dir / "gateway-0.log").read_text(errors="replace").splitlines():
        if '"abort"' in line and "is gone" in line:
            aborted.add(json.loads(line)["request_id"])
    for line in (cluster.log_dir / "scheduler-0.log").read_text(errors="replace").splitlines():
        if '"aborted"' in line and "its gateway" in line:
            aborted.add(json.loads(line)["request_id"])
    return aborted


def _trace(cluster: LocalCluster, request_id: str) -> str:
    """Every log line about one request, from every process: what a failed assertion needs."""
    assert cluster.log_dir is not None
    lines = [
        f"{log.stem}: {line[:300]}"
        for log in sorted(cluster.log_dir.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if request_id and request_id in line
    ]
    return "\n".join(lines)


def _child(cluster: LocalCluster, name: str) -> Child:
    return next(c for c in cluster.group.children if c.name == name)


def _pid(cluster: LocalCluster, name: str) -> int:
    if name == "nats-server":
        assert cluster.nats is not None
        return cluster.nats.process.pid
    return _child(cluster, name).process.pid


def _kv_in_use(cluster: LocalCluster) -> dict[str, float | None]:
    """KV blocks in use per instance (its own gauge); None where its /metrics does not answer (yet)."""
    used: dict[str, float | None] = {}
    for name, port in cluster.metrics_ports.items():
        if name.startswith("scheduler"):
            continue
        try:
            used[name] = scrape_metrics(port)["adrenaline_kv_blocks_used"]
        except (OSError, urllib.error.URLError, KeyError):
            used[name] = None
    return used


def _counter(cluster: LocalCluster, name: str) -> float:
    """What this instance process has moved over UCX: prompt KV sent (prefill) or received (decode,
    executor). A fresh process starts at zero, so above zero means the restarted one served."""
    direction = "send" if name.startswith("prefill") else "recv"
    try:
        metrics = scrape_metrics(cluster.metrics_ports[name])
    except OSError:
        return 0.0
    return metrics.get(f'adrenaline_kv_transfer_bytes_total{{direction="{direction}"}}', 0.0)


def _decoded_rows(cluster: LocalCluster) -> float:
    """Rows decoded so far by every decode instance (local and offloaded attention)."""
    total = 0.0
    for name, port in cluster.metrics_ports.items():
        if name.startswith("decode"):
            metrics = scrape_metrics(port)
            total += sum(v for k, v in metrics.items() if k.startswith("adrenaline_decode_rows_total"))
    return total


def _prompts(count: int, offset: int) -> list[str]:
    return [" ".join(WORDS[(offset + i + j) % len(WORDS)] for j in range(3 + (offset + i) % 5)) for i in range(count)]


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared test model's weights with `MODEL_POSITIONS` positions (RoPE's frequencies do not
    depend on it, so its output is the shared model's)."""
    return make_tiny(tmp_path_factory.mktemp("long") / "llama", "llama", max_position_embeddings=MODEL_POSITIONS)


@pytest.fixture(scope="module")
def reference(long_llama_dir: Path) -> dict[str, str]:
    """transformers' greedy text for the checks' prompts (the load's are held to each other: a
    thousand tokens each would cost transformers minutes here)."""
    return dict(zip(CHECK_PROMPTS, transformers_texts(long_llama_dir, CHECK_PROMPTS, CHECK_TOKENS), strict=True))


@pytest.fixture(scope="module")
def load_texts() -> dict[str, str]:
    """Each load prompt's text, as its first completed stream had it: every later completion of the
    same prompt, in any case, must equal it (a lost or doubled token would not)."""
    return {}


@pytest.fixture(scope="module")
def supervised(long_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervision]:
    cluster = LocalCluster(
        long_llama_dir,
        port=free_port(),
        scale={"prefill": 2, "decode": 2},
        offload_ratio=0.5,  # every other request's KV and attention on an executor
        kv_cache_bytes=16 * 2**20,  # 32k tokens: a killed gateway's 12 streams fit
        env={"ADRENALINE_THREADS": "1", "ADRENALINE_TOKEN_TIMEOUT_S": str(TOKEN_TIMEOUT_S)},
        log_dir=tmp_path_factory.mktemp("logs"),
        prefix="faults",
    )
    cluster.start()
    try:
        cluster.wait_ready(timeout=RECOVERY_S)
        supervision = Supervision(cluster)
        yield supervision
    finally:
        cluster.stop()
    assert not supervision.supervisor.given_up, supervision.said


async def _load(supervision: Supervision, inject: Callable[[], object], max_tokens: int) -> tuple[list[Outcome], float]:
    """Two waves of streams, the fault injected (`inject`, a coroutine function) once the first
    decodes and the second has begun; every stream's outcome, and when the fault was injected."""
    cluster = supervision.cluster
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=30.0)
    outcomes = [Outcome(w, p) for w in (0, 1) for p in _prompts(WAVE, w * WAVE)]

    async def stream(o: Outcome) -> None:
        start = time.monotonic()
        try:
            chunks = await client.completions.create(
                model=cluster.model.name,
                prompt=o.prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in chunks:
                o.request_id = chunk.id
                if chunk.usage is not None:
                    o.tokens = chunk.usage.completion_tokens
                if chunk.choices:
                    o.text += chunk.choices[0].text
                    o.chunks += 1
            o.done = True
        except (openai.APIError, httpx.TransportError) as exc:  # the second: a killed gateway's dropped stream
            o.error = exc
        finally:
            o.seconds = time.monotonic() - start

    async def until(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + REQUEST_BOUND_S
        while not check():
            assert time.monotonic() < deadline, f"not within {REQUEST_BOUND_S} s: {what}"
            await asyncio.sleep(0.02)

    keeper = asyncio.create_task(supervision.run())
    tasks = [asyncio.create_task(asyncio.wait_for(stream(o), REQUEST_BOUND_S)) for o in outcomes[:WAVE]]
    try:
        await until(lambda: all(o.chunks >= 2 or o.error for o in outcomes[:WAVE]), "the first wave decodes")
        assert not [o.error for o in outcomes if o.error], "a request failed before the fault"
        tasks += [asyncio.create_task(asyncio.wait_for(stream(o), REQUEST_BOUND_S)) for o in outcomes[WAVE:]]
        await until(lambda: any(o.chunks or o.error for o in outcomes[WAVE:]), "the second wave begins")
        injected = time.monotonic()
        await inject()  # type: ignore[misc]
        ended = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        keeper.cancel()
        for task in tasks:
            task.cancel()
        await client.close()
    hung = [o.prompt for o, e in zip(outcomes, ended, strict=True) if isinstance(e, TimeoutError)]
    assert not hung, f"requests outlived {REQUEST_BOUND_S} s: {hung}"
    assert all(e is None for e in ended), ended
    return outcomes, injected


def _kill(cluster: LocalCluster, name: str) -> Callable[[], object]:
    async def kill() -> None:
        if name == "nats-server":
            assert cluster.nats is not None
            cluster.nats.process.kill()
            cluster.nats.process.wait()
        else:
            cluster.group.kill(name)

    return kill


def _pause(cluster: LocalCluster, name: str) -> Callable[[], object]:
    async def pause() -> None:
        pid = _pid(cluster, name)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(PAUSE_S)
        finally:
            os.kill(pid, signal.SIGCONT)

    return pause


def _serves(supervision: Supervision, reference: dict[str, str], restarted: str) -> None:
    """Greedy requests equal transformers; with an instance restarted, until it has served one too."""
    cluster = supervision.cluster

    instance = restarted.startswith(("prefill", "decode", "executor"))
    for _ in range(8):  # three requests a round, spread by the scheduler: the restarted one gets some
        texts = greedy_completions(cluster.url, cluster.model.name, CHECK_PROMPTS, CHECK_TOKENS, timeout=30.0)
        assert texts == [reference[p] for p in CHECK_PROMPTS]
        if not instance or _counter(cluster, restarted) > 0:
            return
    raise AssertionError(f"{restarted} came back but served none of 24 requests")


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("action", "target"), FAULTS, ids=[f"{a}-{t}" for a, t in FAULTS])
def test_fault_under_load(
    supervised: Supervision, reference: dict[str, str], load_texts: dict[str, str], action: str, target: str
) -> None:
    cluster = supervised.cluster
    name = TARGETS[target]
    expected = set().union(*(cluster.expected(r) for r in ("prefill", "decode", "attention-executor")))
    supervised.until(lambda: healthy(cluster.url), "the gateway is ready before the fault", RECOVERY_S)
    supervised.until(lambda: not any(_kv_in_use(cluster).values()), "no KV in use before the fault", KV_FREE_S)
    pid_before = _pid(cluster, name)
    rows_before = _decoded_rows(cluster)

    inject = _kill(cluster, name) if action == "kill" else _pause(cluster, name)
    max_tokens = GATEWAY_MAX_TOKENS if (action, target) == ("kill", "gateway") else MAX_TOKENS
    outcomes, injected = asyncio.run(_load(supervised, inject, max_tokens))

    # Every request ended within the bound (`_load`), completed or with a clean error.
    routes = _routes(cluster)
    failed = [o for o in outcomes if o.error is not None]
    for o in outcomes:
        if o.done:  # a stream that completed has its whole, right text: no token lost or doubled
            assert o.tokens == max_tokens, (o.prompt, o.tokens, _trace(cluster, o.request_id))
            same = o.text == load_texts.setdefault(f"{max_tokens}:{o.prompt}", o.text)
            assert same, (o.prompt, _trace(cluster, o.request_id))
    if target in ("gateway", "scheduler", "nats-server") and action == "pause":
        assert not failed, [(o.error, _trace(cluster, o.request_id)) for o in failed]  # a short pause fails none
    elif target == "gateway":  # killed: its connections drop; the backends must stop its requests
        assert all(isinstance(o.error, httpx.TransportError | openai.APIConnectionError) for o in failed), failed
        assert len(failed) >= WAVE, [o.request_id for o in outcomes if o.done]  # most were mid-stream
    elif target == "scheduler":  # killed: what it had routed needs it no more
        lost = [o for o in failed if o.request_id in routes]
        assert not lost, [(routes[o.request_id], o.error, _trace(cluster, o.request_id)) for o in lost]
    elif target != "nats-server":  # an instance: requests routed elsewhere finish
        spared = [o for o in failed if o.request_id in routes and not routes[o.request_id].touches(name)]
        assert not spared, [(routes[o.request_id], o.error, _trace(cluster, o.request_id)) for o in spared]
    print(
        f"{action} {name}: {len(outcomes) - len(failed)} completed, {len(failed)} failed cleanly; "
        f"longest {max(o.seconds for o in outcomes):.1f} s"
    )

    # The killed process comes back (a paused one was never gone), the cluster lists it again.
    if action == "kill":
        supervised.until(lambda: _pid(cluster, name) != pid_before, f"{name} restarted", RECOVERY_S)
    supervised.until(
        lambda: all(c.alive for c in cluster.group.children) and cluster.nats_alive, "every process runs", RECOVERY_S
    )
    status = cluster.wait_ready(timeout=RECOVERY_S)
    assert expected <= {*status.prefill, *status.decode, *status.executor}, status

    # KV returns to zero everywhere; a dead gateway's requests were stopped, not run to their end.
    freed = supervised.until(lambda: not any(_kv_in_use(cluster).values()), "KV back to zero", KV_FREE_S)
    since, rows = time.monotonic() - injected, _decoded_rows(cluster) - rows_before
    print(f"KV free {freed:.1f} s after the load ended, {since:.1f} s after the fault; {rows:.0f} rows decoded")
    if target == "gateway" and action == "kill":
        assert since < GATEWAY_ABORT_S, f"a dead gateway's requests held KV for {since:.1f} s"
        assert rows < 0.7 * len(outcomes) * max_tokens, f"the backends decoded {rows} rows: not aborted"
        # Those still running when it was back (a decode instance with fewer of them may finish
        # first), and only those, were aborted by the restarted gateway or the scheduler.
        aborted = _aborted_as_orphans(cluster) - supervised.orphans_seen
        supervised.orphans_seen |= aborted
        assert aborted and aborted <= set(routes), aborted

    _serves(supervised, reference, name if action == "kill" else "")

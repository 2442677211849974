"""Replicas as compose starts them: prefill pairs with ids of their own, and a gateway that dies for good.

One cluster serves the module: a scheduler, a decode instance and a gateway as `adrenaline up`
starts them, and two replicas of compose.yaml's `prefill` service, each `python -m services.pair`
(a prefill instance and its attention executor) started the way `docker compose up --scale
prefill=2` starts them: the same command and environment, from compose.yaml, differing only in
their hostname (Docker sets HOSTNAME per container). Only what differs between a container
network and one machine is replaced, as `adrenaline up` does: the NATS URL, the model, the
secret files' folder, the KV budgets (compose's are for GPUs), the metrics ports (as
deploy/compose.monitoring.yaml turns them on).

- Each replica's executor is paired with its own prefill instance: every offloaded request's
  executor is the one beside the prefill instance that took it, both pairs serve, and greedy
  output equals transformers.
- A second gateway, SIGKILLed under load and never restarted (compose draws a gateway id per
  process, so a new one never takes its requests back): the scheduler stops hearing its
  heartbeats and aborts its requests within `ADRENALINE_GATEWAY_DEAD_AFTER_S`, and KV returns to
  zero everywhere, long before the requests could have run out.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from common import nats_auth
from common.bus import Bus
from common.messages import ClusterStatus, StatusRequest
from common.metrics import scrape_metrics
from common.natsd import free_port
from common.subjects import Subjects
from services.local_cluster import COMPOSE_FILE, LocalCluster, healthy
from tests.e2e.helpers import greedy_completions, proc_stat, transformers_texts

HOSTS = ("replica-a", "replica-b")  # the two prefill containers' hostnames
PREFILLS = {f"prefill-{h}" for h in HOSTS}
EXECUTORS = {f"prefill-{h}-executor" for h in HOSTS}
GATEWAY_DEAD_AFTER_S = 3.0  # the scheduler's bound on a silent gateway (well above a loaded gateway's beat)
PROMPTS = ("adrenaline attention batch", "block cache decode executor gateway", "kernel layer memory", "decode")
CHECK_TOKENS = 12
STREAMS = 4  # through the gateway that dies
MAX_TOKENS = 1900  # near the model's 2048 positions: tens of seconds here, far longer than the bound
READY_S = 180.0  # six processes load the model on a shared CPU
KV_FREE_S = 60.0  # the bound, a reap tick, and an abort that waits out a KV transfer at most


@dataclass
class Replicas:
    cluster: LocalCluster
    metrics: dict[str, int] = field(default_factory=dict)  # instance id -> its metrics port


def _compose_prefill_env(cluster: LocalCluster, secrets: Path, host: str, ports: tuple[int, int]) -> dict[str, str]:
    """compose.yaml's prefill environment for the container named `host`, with what one machine changes."""
    spec = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prefill"]
    assert spec["command"] == ["python", "-m", "services.pair"]
    env = {k: str(v) for k, v in spec["environment"].items()}
    for key, value in env.items():
        if key.endswith("_PASSWORD_FILE"):  # compose mounts secrets at /run/secrets/<name>
            env[key] = str(secrets / Path(value).name)
    env.update(
        {
            "HOSTNAME": host,
            "ADRENALINE_NATS_URL": cluster.url_of_nats,
            "ADRENALINE_MODEL": str(cluster.model),
            "ADRENALINE_KV_CACHE_BYTES": str(4 * 2**20),
            "EXECUTOR_ADRENALINE_KV_CACHE_BYTES": str(8 * 2**20),
            "ADRENALINE_METRICS_PORT": str(ports[0]),
            "EXECUTOR_ADRENALINE_METRICS_PORT": str(ports[1]),
            "ADRENALINE_THREADS": "1",
            "ADRENALINE_UCX_NET_DEVICES": "lo",
        }
    )
    return env


async def _status(cluster: LocalCluster) -> ClusterStatus | None:
    bus = await Bus.connect(cluster.url_of_nats, "test-replicas", cluster.credentials(nats_auth.OBSERVER))
    try:
        return await bus.request(Subjects(cluster.prefix).status, StatusRequest(), ClusterStatus, 1.0)
    except Exception:
        return None
    finally:
        await bus.close()


def _until(check: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll `check` until it holds; the seconds it took. The bound only stops a broken cluster."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def replicas(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    cluster = LocalCluster(
        llama_dir,
        port=free_port(),
        roles=frozenset({"scheduler", "decode", "gateway"}),  # prefill comes from the pairs
        offload_ratio=1.0,  # every request's KV and attention on the executor beside its prefill instance
        kv_cache_bytes=8 * 2**20,
        env={"ADRENALINE_THREADS": "1", "ADRENALINE_GATEWAY_DEAD_AFTER_S": str(GATEWAY_DEAD_AFTER_S)},
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    assert cluster.passwords is not None
    secrets = tmp_path_factory.mktemp("secrets")
    for user, password in cluster.passwords.items():  # as `make compose-secrets` writes them
        (secrets / f"nats-{user}").write_text(password + "\n")
    replicas = Replicas(cluster)
    cluster.start()
    try:
        for host in HOSTS:
            ports = (free_port(), free_port())
            replicas.metrics |= {f"prefill-{host}": ports[0], f"prefill-{host}-executor": ports[1]}
            cluster.group.spawn(host, "services.pair", (), _compose_prefill_env(cluster, secrets, host, ports))
        replicas.metrics["decode-0"] = cluster.metrics_ports["decode-0"]

        def ready() -> bool:
            dead = cluster.group.dead()
            assert not dead, [(c.name, cluster.group.tail(c.name)) for c in dead]
            status = asyncio.run(_status(cluster))
            listed = status is not None and set(status.prefill) >= PREFILLS and set(status.executor) >= EXECUTORS
            return listed and healthy(cluster.url)

        _until(ready, "both pairs and the gateway are up", READY_S)
        yield replicas
    finally:
        launchers = [c.process.pid for c in cluster.group.children if c.name in HOSTS]
        pair_processes = [pid for launcher in launchers for pid in _children_of(launcher)]
        cluster.stop()
    # stopped as `docker compose stop` stops a container (SIGTERM to the launcher): no process left
    assert len(pair_processes) == 2 * len(HOSTS) and not any(map(_running, pair_processes)), pair_processes
    violations = [  # each process logs in as its role (compose's users): a subject it lacks shows here
        f"{log.name}: {line}"
        for log in sorted(cluster.log_dir.glob("*.log"))  # type: ignore[union-attr]
        for line in log.read_text(errors="replace").splitlines()
        if "Violation" in line
    ]
    assert not violations, "\n".join(violations)


def _children_of(parent: int) -> list[int]:
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if (stat := proc_stat(pid)) is not None and int(stat[1]) == parent]


def _running(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has ended


def _scheduler_log(cluster: LocalCluster) -> list[dict[str, object]]:
    assert cluster.log_dir is not None
    lines = (cluster.log_dir / "scheduler-0.log").read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _received(replicas: Replicas, instance_id: str) -> float:
    metrics = scrape_metrics(replicas.metrics[instance_id])
    return metrics.get('adrenaline_kv_transfer_bytes_total{direction="recv"}', 0.0)


def _kv_in_use(replicas: Replicas) -> dict[str, float | None]:
    used: dict[str, float | None] = {}
    for name, port in replicas.metrics.items():
        try:
            used[name] = scrape_metrics(port)["adrenaline_kv_blocks_used"]
        except (OSError, urllib.error.URLError, KeyError):
            used[name] = None
    return used


@pytest.mark.timeout(300)
def test_each_prefill_replica_serves_with_its_own_executor(replicas: Replicas, llama_dir: Path) -> None:
    cluster = replicas.cluster
    expected = transformers_texts(llama_dir, PROMPTS, CHECK_TOKENS)

    # Concurrent requests spread over the prefill instances (the least queued takes each); a few
    # rounds until both executors have taken offloaded requests.
    for _ in range(6):
        assert greedy_completions(cluster.url, cluster.model.name, PROMPTS, CHECK_TOKENS, timeout=60) == expected
        if all(_received(replicas, e) > 0 for e in EXECUTORS):
            break
    assert all(_received(replicas, e) > 0 for e in EXECUTORS), {e: _received(replicas, e) for e in EXECUTORS}

    routes = [e for e in _scheduler_log(cluster) if e.get("event") == "routed"]
    assert {r["prefill_id"] for r in routes} == PREFILLS
    for route in routes:  # offload ratio 1: every request on the executor beside its prefill instance
        assert route["executor_id"] == f"{route['prefill_id']}-executor", route


@pytest.mark.timeout(300)
def test_a_gateway_that_dies_for_good_has_its_requests_aborted(replicas: Replicas) -> None:
    cluster = replicas.cluster
    assert cluster.passwords is not None
    _until(lambda: not any(_kv_in_use(replicas).values()), "no KV in use before", KV_FREE_S)
    port = free_port()
    env = {  # a gateway of its own, as a compose replica: its own id, the gateway role's credentials
        "ADRENALINE_NATS_URL": cluster.url_of_nats,
        "ADRENALINE_MODEL": str(cluster.model),
        "ADRENALINE_SUBJECTS_PREFIX": cluster.prefix,
        "ADRENALINE_GATEWAY_ID": "gateway-doomed",
        "ADRENALINE_NATS_USER": "gateway",
        "ADRENALINE_NATS_PASSWORD": cluster.passwords["gateway"],
    }
    cluster.group.spawn("gateway-doomed", "services.gateway", ["--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    _until(lambda: healthy(url), "the second gateway is ready", READY_S)
    rows_before = _rows(replicas)

    request_ids: set[str] = set()
    chunks: dict[str, int] = {}

    async def stream(client: openai.AsyncOpenAI, prompt: str) -> None:
        try:
            reply = await client.completions.create(
                model=cluster.model.name,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            async for chunk in reply:
                request_ids.add(chunk.id)
                chunks[chunk.id] = chunks.get(chunk.id, 0) + 1
        except (openai.APIError, httpx.TransportError):
            pass  # the gateway died under it

    async def load() -> float:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        tasks = [asyncio.create_task(stream(client, PROMPTS[i % len(PROMPTS)])) for i in range(STREAMS)]
        deadline = time.monotonic() + READY_S
        while len(chunks) < STREAMS or min(chunks.values()) < 2:  # every stream decoding
            assert time.monotonic() < deadline, chunks
            await asyncio.sleep(0.02)
        # and its KV shown where it lives (gauges follow heartbeats): else "KV back to zero" below
        # could read a gauge from before the requests came, and pass before anything was aborted
        while not sum(v or 0 for v in _kv_in_use(replicas).values()):
            assert time.monotonic() < deadline, _kv_in_use(replicas)
            await asyncio.sleep(0.05)
        cluster.group.kill("gateway-doomed")  # SIGKILL, and nobody restarts it
        killed = time.monotonic()
        await asyncio.gather(*tasks)
        await client.close()
        return killed

    killed = asyncio.run(load())

    def aborted() -> set[str]:
        return {
            str(e["request_id"])
            for e in _scheduler_log(cluster)
            if e.get("event") == "aborted" and "gateway" in str(e.get("reason"))
        }

    # The scheduler aborts every one of its requests for the gateway's silence, not one more.
    _until(lambda: len(aborted()) >= len(request_ids), "the scheduler aborted the gateway's requests", KV_FREE_S)
    assert aborted() == request_ids, (aborted(), request_ids)
    freed = _until(lambda: not any(_kv_in_use(replicas).values()), "KV back to zero everywhere", KV_FREE_S)
    since = time.monotonic() - killed
    rows = _rows(replicas) - rows_before
    print(f"\ngateway killed: KV free {since:.1f} s later (bound {GATEWAY_DEAD_AFTER_S} s); {rows:.0f} rows decoded")
    lost = [e for e in _scheduler_log(cluster) if e.get("event") == "gateways lost"]
    assert [e["token_subjects"] for e in lost] == [[Subjects(cluster.prefix).tokens("gateway-doomed")]], lost
    # aborted while still running (the scheduler forgets a request once it ends), and decoding stopped
    assert rows < STREAMS * MAX_TOKENS, f"the backends decoded {rows} rows: all of them"
    assert healthy(cluster.url), f"KV was free {freed:.1f} s after the streams ended, but the other gateway fails"


def _rows(replicas: Replicas) -> float:
    """Rows decoded so far by the decode instance (local and offloaded attention)."""
    metrics = scrape_metrics(replicas.metrics["decode-0"])
    return sum(v for k, v in metrics.items() if k.startswith("adrenaline_decode_rows_total"))

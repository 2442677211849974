"""`adrenaline up`'s foreground: start a `LocalCluster`, supervise it, stop it on a signal; and its flags.

Running: a service that fails is restarted with backoff and given up on in a crash loop
(`services.supervisor`), and so is nats-server, on the same port (`NatsKeeper`).

Stopping: the first SIGINT or SIGTERM, at any point (start-up included), stops the services with
SIGTERM while NATS still runs, so they can drain; those still there after a grace period are
killed; nats-server goes last. A second signal kills everything at once. nats-server and the
services run in sessions of their own, so a terminal's Ctrl-C reaches only this process, and
die with it if it is killed outright.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from services.local_cluster import ROLES, LocalCluster, Stopped
from services.supervisor import RestartBudget, Supervisor


def run_until_signalled(cluster: LocalCluster) -> int:
    """`adrenaline up`'s foreground: start, report, wait for Ctrl-C or SIGTERM, stop everything.

    The first signal (whenever it comes, start-up included) asks for an orderly stop, bounded by
    `LocalCluster.stop`'s grace; a second one kills every process at once. Either way every
    process is gone when this returns.
    """
    signals = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals
        signals += 1
        cluster.stopping = True
        if signals > 1:
            cluster.kill()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            cluster.start()
            status = cluster.wait_ready()
        except Stopped:
            return 0
        credentials = cluster.write_observer_credentials()
        watch = f"adrenaline status --watch --nats-url {cluster.url_of_nats}"
        if credentials is not None:
            watch += f" --credentials {credentials}"
        prometheus = cluster.write_prometheus_config()
        serving = f"serving the OpenAI API at {cluster.url}/v1" if "gateway" in cluster.roles else "up"
        here = ", ".join(child.name for child in cluster.group.children)
        print(
            f"Adrenaline is {serving} (here: {here}; in the cluster: prefill {status.prefill}, "
            f"decode {status.decode}; logs in {cluster.log_dir})\n"
            f"Watch it: {watch}\n"
            f"Scrape it: prometheus --config.file={prometheus}",
            flush=True,
        )
        supervisor = Supervisor(cluster.group, say=_say)
        nats = NatsKeeper(cluster, RestartBudget(supervisor.policy))
        while not cluster.stopping:
            supervisor.poll()
            nats.poll()
            time.sleep(0.2)
        return 0
    finally:
        with contextlib.suppress(OSError):  # a closed terminal or pipe must not keep the cluster running
            print("stopping the cluster", flush=True)
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # a closed terminal or pipe must not stop the supervision
        print(text, flush=True)


@dataclass
class NatsKeeper:
    """Restarts nats-server when it dies, on the `Supervisor`'s terms (backoff, crash-loop bound)."""

    cluster: LocalCluster
    budget: RestartBudget
    due: float | None = None
    given_up: bool = False

    def poll(self) -> None:
        cluster = self.cluster
        if cluster.nats is None or cluster.nats_alive or self.given_up:
            return
        now = time.monotonic()
        if self.due is None:
            code = cluster.nats.process.returncode
            delay = self.budget.next_delay(now)
            if delay is None:
                self.given_up = True
                _say(f"error: nats-server exited with {code} again: a crash loop, giving up; the services are cut off")
                return
            _say(f"warning: nats-server exited with {code}; the services cannot reach each other; restarting it")
            self.due = now + delay
        elif now >= self.due:
            self.due = None
            self.budget.restarted(now)
            try:
                cluster.restart_nats()
            except (OSError, RuntimeError, TimeoutError) as exc:
                _say(f"warning: nats-server did not start again: {exc}")
                return
            _say("nats-server restarted; the services reconnect to it")


def parse_scale(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        role, _, count = item.partition("=")
        if role not in ("prefill", "decode") or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--scale {item!r}: expected prefill=N or decode=N with N >= 1")
        out[role] = int(count)
    return out


def parse_roles(text: str) -> frozenset[str]:
    """`--roles`: a comma-separated subset of ROLES (attention_executor also accepted); empty: all."""
    if not text.strip():
        return frozenset(ROLES)
    roles = frozenset(r.strip().replace("_", "-") for r in text.split(",") if r.strip())
    unknown = roles - set(ROLES)
    if unknown:
        raise ValueError(f"--roles: unknown {sorted(unknown)}; the roles are {', '.join(ROLES)}")
    return roles


def parse_pin(items: list[str]) -> dict[str, set[int]]:
    out = {}
    cpus_here = os.sched_getaffinity(0)
    for item in items:
        role, _, cpus = item.partition("=")
        try:
            chosen = {int(c) for c in cpus.split(",")}
        except ValueError:
            chosen = set()
        if role not in ROLES or not chosen or not chosen <= cpus_here:
            raise ValueError(f"--pin {item!r}: expected ROLE=CPU[,CPU...] with CPUs from {sorted(cpus_here)}")
        out[role] = chosen
    return out

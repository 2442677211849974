"""`python -m services.pair`: a prefill instance and its attention executor, one pair per container.

compose.yaml's `prefill` service runs this, so that every replica of it (`docker compose up
--scale prefill=2`) is a prefill instance with ids of its own and its executor beside it, on the
same GPU, as every Kubernetes prefill pod holds both containers (deploy/k8s/base/prefill.yaml).
Two compose services could not pair their replicas: each prefill replica had the id that
compose.yaml fixed, and the one executor paired with one of them.

Ids: the prefill instance is ADRENALINE_INSTANCE_ID, else `prefill-<hostname>`. A container's
hostname is its own (Docker sets HOSTNAME to the container's id): unique per replica, and the
same when compose restarts that container, so a restarted pair rejoins under its ids. The
executor is `<prefill id>-executor` and names the prefill instance as the one it is colocated
with (ADRENALINE_COLOCATED_WITH), as on Kubernetes.

Environment: both processes get the container's. A variable EXECUTOR_<NAME> sets <NAME> in the
executor's process alone (its NATS user and password file, its KV budget, its share of the GPU's
SMs); no service reads EXECUTOR_* itself, so the prefill instance ignores them.

Supervision, as `adrenaline up`'s (`services.supervisor`): a process that fails is restarted
with backoff, alone (its partner keeps its requests, as a pod restarts one container); on a
crash loop, or when one of them exits cleanly, the launcher stops the other and exits (1 after a
crash loop), so that compose's `restart: on-failure` starts the pair afresh. SIGTERM or SIGINT
(`docker compose stop`, Ctrl-C) stops both within their grace and exits 0; a second signal kills
them at once. This module imports neither torch nor the services: the launcher stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.launcher import ProcessGroup
from services.supervisor import RestartPolicy, Supervisor

PREFILL_MODULE = "services.prefill"
EXECUTOR_MODULE = "services.attention_executor"
EXECUTOR_PREFIX = "EXECUTOR_"  # EXECUTOR_<NAME> sets <NAME> for the executor alone
MAX_ID_LEN = 256  # as `common.messages` checks instance ids
GRACE_S = 5.0  # a little longer than the services' own bound on their shutdown (services.runtime)


@dataclass(frozen=True)
class Process:
    """One process of the pair: its name in the launcher's messages, its module, its own environment."""

    name: str
    module: str
    env: dict[str, str]
    args: tuple[str, ...] = ()


def split_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the prefill instance's environment, the executor's): EXECUTOR_<NAME> is the executor's <NAME>."""
    prefill = {k: v for k, v in env.items() if not k.startswith(EXECUTOR_PREFIX)}
    executor = {**prefill, **{k[len(EXECUTOR_PREFIX) :]: v for k, v in env.items() if k.startswith(EXECUTOR_PREFIX)}}
    executor.pop("", None)  # a bare EXECUTOR_ names nothing
    return prefill, executor


def hostname(env: Mapping[str, str]) -> str:
    """This container's hostname as a NATS subject token: HOSTNAME (Docker sets it), else the kernel's;
    characters a subject token cannot hold (a domain's dots) become dashes."""
    name = env.get("HOSTNAME") or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def pair_ids(env: Mapping[str, str]) -> tuple[str, str]:
    """(prefill id, executor id) of this container's pair."""
    prefill_id = env.get("ADRENALINE_INSTANCE_ID") or f"prefill-{hostname(env)}"
    executor_id = f"{prefill_id}-executor"
    bad = set(".*> \t\r\n") & set(prefill_id)
    if bad or len(executor_id) > MAX_ID_LEN:
        raise ValueError(f"instance id {prefill_id!r} cannot name NATS subjects (or is too long)")
    return prefill_id, executor_id


def processes(env: Mapping[str, str]) -> list[Process]:
    """The pair's two processes, with their ids and the executor's pairing set."""
    prefill_env, executor_env = split_env(env)
    prefill_id, executor_id = pair_ids(prefill_env)
    return [
        Process("prefill", PREFILL_MODULE, {**prefill_env, "ADRENALINE_INSTANCE_ID": prefill_id}),
        Process(
            "attention-executor",
            EXECUTOR_MODULE,
            {**executor_env, "ADRENALINE_INSTANCE_ID": executor_id, "ADRENALINE_COLOCATED_WITH": prefill_id},
        ),
    ]


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # a closed output must not stop the supervision
        print(f"pair: {text}", flush=True)


def run(
    env: Mapping[str, str],
    grace_s: float = GRACE_S,
    policy: RestartPolicy | None = None,
    pair: Sequence[Process] | None = None,
) -> int:
    """Start the pair (`processes(env)` unless given), supervise it until a signal (0), a crash
    loop (1) or a clean exit of one of them (0)."""
    pair = processes(env) if pair is None else pair
    group = ProcessGroup(log_dir=None)  # both write to the container's output, as compose shows it
    signals = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            group.kill_all()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for process in pair:
            group.spawn(process.name, process.module, process.args, process.env)
        _say(", ".join(f"{p.name} {p.env.get('ADRENALINE_INSTANCE_ID', '')}" for p in pair))
        supervisor = Supervisor(group, policy, say=_say)
        while not signals:
            supervisor.poll()
            if supervisor.given_up:
                code = 1
                break
            if len(group.children) < len(pair):  # one exited cleanly: nobody asked us to stop it
                break
            time.sleep(0.2)
    finally:
        _say("stopping")
        group.stop(grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.pair", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    try:
        return run(os.environ)
    except ValueError as exc:
        print(f"python -m services.pair: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The pair launcher compose's prefill service runs (services/pair.py): ids per replica, the
executor's own environment, and the launcher's exit on a crash loop (so compose restarts it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services import pair
from services.local_cluster import read_compose
from services.supervisor import RestartPolicy

ROOT = Path(__file__).resolve().parents[2]


def test_each_replica_gets_ids_of_its_own_from_its_hostname() -> None:
    ids = {pair.pair_ids({"HOSTNAME": host}) for host in ("3f4e5a6b7c8d", "9a8b7c6d5e4f")}
    assert ids == {
        ("prefill-3f4e5a6b7c8d", "prefill-3f4e5a6b7c8d-executor"),
        ("prefill-9a8b7c6d5e4f", "prefill-9a8b7c6d5e4f-executor"),
    }
    # a domain's dots cannot be in a NATS subject token; a chosen id wins over the hostname
    assert pair.pair_ids({"HOSTNAME": "node1.example.com"})[0] == "prefill-node1-example-com"
    assert pair.pair_ids({"HOSTNAME": "h", "ADRENALINE_INSTANCE_ID": "p7"}) == ("p7", "p7-executor")
    with pytest.raises(ValueError, match="cannot name NATS subjects"):
        pair.pair_ids({"ADRENALINE_INSTANCE_ID": "a.b"})


def test_the_executor_reads_its_own_variables_and_names_its_prefill_instance() -> None:
    env = {
        "HOSTNAME": "c1",
        "ADRENALINE_NATS_USER": "prefill",
        "ADRENALINE_KV_CACHE_BYTES": "1GiB",
        "EXECUTOR_ADRENALINE_NATS_USER": "attention_executor",
        "EXECUTOR_ADRENALINE_KV_CACHE_BYTES": "16GiB",
        "ADRENALINE_MODEL": "/models/m",
    }
    prefill, executor = pair.processes(env)
    assert (prefill.module, executor.module) == ("services.prefill", "services.attention_executor")
    assert prefill.env["ADRENALINE_INSTANCE_ID"] == "prefill-c1"
    assert (prefill.env["ADRENALINE_NATS_USER"], prefill.env["ADRENALINE_KV_CACHE_BYTES"]) == ("prefill", "1GiB")
    assert not any(k.startswith("EXECUTOR_") for k in prefill.env)
    assert executor.env["ADRENALINE_INSTANCE_ID"] == "prefill-c1-executor"
    assert executor.env["ADRENALINE_COLOCATED_WITH"] == "prefill-c1"
    assert executor.env["ADRENALINE_NATS_USER"] == "attention_executor"
    assert executor.env["ADRENALINE_KV_CACHE_BYTES"] == "16GiB"
    assert executor.env["ADRENALINE_MODEL"] == "/models/m"  # shared


def test_compose_runs_the_pair_and_adrenaline_up_reads_both_roles_from_it() -> None:
    """compose.yaml's prefill service is the pair, with no fixed id (one id per replica), each process
    logging in as its own role; `adrenaline up` takes each role's module and variables from it."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert "attention-executor" not in services  # it lives in each prefill container
    spec = services["prefill"]
    assert spec["command"] == ["python", "-m", "services.pair"]
    env = spec["environment"]
    assert "ADRENALINE_INSTANCE_ID" not in env and "EXECUTOR_ADRENALINE_INSTANCE_ID" not in env
    assert "ADRENALINE_INSTANCE_ID" not in services["decode"]["environment"]  # decode-<hostname>-<pid>
    assert {f"nats-{role}" for role in ("prefill", "attention_executor")} == set(spec["secrets"])
    roles = read_compose()
    assert list(roles) == ["scheduler", "prefill", "attention-executor", "decode", "gateway"]
    assert (roles["prefill"].module, roles["attention-executor"].module) == (pair.PREFILL_MODULE, pair.EXECUTOR_MODULE)
    assert roles["prefill"].env["ADRENALINE_NATS_USER"] == "prefill"
    assert roles["attention-executor"].env["ADRENALINE_NATS_USER"] == "attention_executor"
    assert roles["attention-executor"].env["ADRENALINE_NATS_PASSWORD_FILE"] == "/run/secrets/nats-attention_executor"


def test_a_crash_loop_stops_the_partner_and_exits_so_compose_restarts_the_pair() -> None:
    """One process failing for good takes the pair down with status 1 (compose's `restart:
    on-failure` then starts a fresh container) instead of leaving a prefill instance alone."""
    fast = RestartPolicy(first_delay_s=0.01, max_delay_s=0.05, max_restarts=2, window_s=60.0)
    stand_ins = [
        pair.Process("prefill", "tests.child", {}, ("sleep",)),
        pair.Process("attention-executor", "tests.child", {}, ("exit", "3")),
    ]
    assert pair.run({}, grace_s=2.0, policy=fast, pair=stand_ins) == 1

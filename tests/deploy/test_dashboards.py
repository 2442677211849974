"""deploy/grafana and deploy/prometheus ask only for what the services export, so they cannot drift.

Every metric name in the dashboard's PromQL (and in the autoscalers' adapter rule) must be a
sample some service exports, read from prometheus_client's registries after importing the
modules that define them; every label it filters or groups by must be one that metric carries,
or one the scrape configurations add. The scrape configurations must reach every port the
manifests open for metrics, under the `service` label the dashboard groups by.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_k8s import containers, is_adrenaline, workloads

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "adrenaline.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
# Labels Prometheus adds to every series (the scrape configurations' relabelling).
TARGET_LABELS = frozenset({"job", "instance", "service", "namespace", "pod"})
SERVICES = ("gateway", "scheduler", "prefill", "attention-executor", "decode")


@functools.cache
def exported() -> dict[str, frozenset[str]]:
    """Every sample name the services export, with the labels it carries."""
    from prometheus_client import REGISTRY, CollectorRegistry

    import common.metrics
    import services.scheduler.service
    from services.gateway.metrics import GatewayMetrics

    assert common.metrics and services.scheduler.service  # imported for the metrics they register
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    samples: dict[str, frozenset[str]] = {}
    registry: CollectorRegistry
    for registry in (REGISTRY, GatewayMetrics("model").registry):
        for family in registry.collect():
            collector = registry._names_to_collectors.get(family.name)
            # Declared label names, and those of samples from collectors that declare none (process_*).
            labels = set(getattr(collector, "_labelnames", ())) | {n for s in family.samples for n in s.labels}
            for suffix in suffixes[family.type]:
                samples[family.name + suffix] = frozenset(labels | {"le"} if suffix == "_bucket" else labels - {"le"})
    return samples


TOKEN = re.compile(
    r'(?P<string>"(?:[^"\\]|\\.)*")|(?P<duration>\[[^\]]*\])|(?P<variable>\$\w+)'
    r"|(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<op>=~|!~|!=|==|>=|<=|[{}(),=<>+\-*/^%])|(?P<space>\s+)"
)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"bool", "offset", "and", "or", "unless"}


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """PromQL's metric names, each with the labels its matchers name, and the grouping labels.

    Small on purpose: enough for dashboards (functions, aggregations with by/without, binary
    operators, matchers, ranges), and it refuses what it does not understand.
    """
    tokens: list[tuple[str, str]] = []
    expr = re.sub(r"\boffset\s+-?\d[\dsmhdwy]*", " ", expr)  # a duration outside brackets
    position = 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position:]!r} in {expr!r}")
        position = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup or "", match.group()))
    metrics: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in GROUPING and following == "(":
            close = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
            grouping |= {t for k, t in tokens[i + 2 : close] if k == "ident"}
            i = close + 1
            continue
        aggregation = following in GROUPING  # sum by (...) (...)
        if (kind == "ident" and following != "(" and not aggregation and text not in KEYWORDS) or (
            kind == "op" and text == "{"
        ):
            name, labels = (text, set()) if kind == "ident" else ("", set())
            if kind == "ident" and following == "{":
                i += 1
            if tokens[i][1] == "{":
                close = next(j for j in range(i, len(tokens)) if tokens[j][1] == "}")
                labels = {t for j, (k, t) in enumerate(tokens[i + 1 : close], i + 1) if k == "ident"}
                i = close
            if not name:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            metrics.append((name, labels))
        i += 1
    return metrics, grouping


def test_the_promql_reader_finds_names_and_labels() -> None:
    metrics, grouping = selectors(
        'histogram_quantile(0.95, sum by (le, service) (rate(a_bucket{x=~"y{1}"}[$__rate_interval])))'
        " / on (pod) sum without (z) (b:c_total offset 5m) > bool 0.5e3"
    )
    assert metrics == [("a_bucket", {"x"}), ("b:c_total", set())]
    assert grouping == {"le", "service", "pod", "z"}
    with pytest.raises(ValueError):
        selectors('{__name__="a"}')


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[str]:
    board = dashboard()
    found = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    found += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return found


def test_every_metric_and_label_in_the_dashboard_is_exported() -> None:
    known = exported()
    wrong = []
    used = set()
    for expr in expressions():
        expr = re.sub(r"label_values\((\w[\w:]*), (\w+)\)", r'\1{\2=""}', expr)  # Grafana's helper
        metrics, grouping = selectors(expr)
        assert metrics, f"no metric in {expr!r}"
        carried = set(TARGET_LABELS)
        for name, labels in metrics:
            used.add(name)
            if name not in known:
                wrong.append(f"{name}: exported by no service ({expr})")
                continue
            carried |= known[name]
            if labels - known[name] - TARGET_LABELS:
                wrong.append(f"{name}: no label {sorted(labels - known[name] - TARGET_LABELS)} ({expr})")
        if grouping - carried:
            wrong.append(f"grouping by {sorted(grouping - carried)}, which no series here carries ({expr})")
    assert not wrong, "\n".join(wrong)
    # What the dashboard is for: vLLM's request metrics and Adrenaline's offloading at least.
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "adrenaline_decode_rows_total",
        "adrenaline_scheduler_offload_decisions_total",
        "adrenaline_kv_blocks_used",
        "adrenaline_offload_layer_round_trip_seconds_bucket",
        "adrenaline_step_seconds_bucket",
        "adrenaline_batch_size_sum",
    ):
        assert name in used, f"the dashboard shows no {name}"


def test_a_misspelled_metric_would_fail() -> None:
    assert "vllm:num_requests_waiting" in exported()
    assert "vllm:num_requests_waitin" not in exported() and "vllm:prompt_tokens" not in exported()
    assert "vllm:prompt_tokens_total" in exported()  # a counter is read under its _total sample


def test_the_dashboard_is_importable() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_the_autoscalers_metric_comes_from_an_exported_one() -> None:
    rules = yaml.safe_load((PROMETHEUS / "adapter-rules.yaml").read_text())["rules"]["custom"]
    (rule,) = rules
    (source,), _ = selectors(rule["seriesQuery"])
    assert source[0] in exported()
    assert re.fullmatch(rule["name"]["matches"], source[0])
    assert rule["name"]["as"] == "vllm_num_requests_waiting"  # what deploy/k8s/base/hpa.yaml asks for
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])


# The compose service each role runs in: an attention executor runs in every prefill container
# (services/pair.py), and reads the variables prefixed EXECUTOR_ there as its own.
COMPOSE_SERVICE = {role: role for role in SERVICES} | {"attention-executor": "prefill"}
COMPOSE_PREFIX = {role: "EXECUTOR_" if role == "attention-executor" else "" for role in SERVICES}


def _merged_env(spec: dict[str, Any], role: str) -> dict[str, str]:
    """What a role's process reads from its compose service's `environment` (as services.pair splits it)."""
    from services.pair import split_env

    env = {k: str(v) for k, v in (spec.get("environment") or {}).items() if k != "<<"}
    prefill, executor = split_env(env)
    return executor if COMPOSE_PREFIX[role] else prefill


def test_compose_scrape_configuration_covers_every_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    monitoring = yaml.safe_load((ROOT / "deploy" / "compose.monitoring.yaml").read_text())["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SERVICES)
    ports: dict[tuple[str, int], str] = {}
    for name, job in jobs.items():
        service = COMPOSE_SERVICE[name]
        assert service in compose, f"{service} is no compose.yaml service"
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [service]
        assert {"target_label": "service", "replacement": name} in job["relabel_configs"]
        assert ports.setdefault((service, sd["port"]), name) == name, f"{name} and {ports[(service, sd['port'])]}"
        if name == "gateway":
            assert sd["port"] == 8000
        else:  # compose.monitoring.yaml turns the endpoint on, on that port, on every address
            env = _merged_env(monitoring[service], name)
            assert env["ADRENALINE_METRICS_PORT"] == str(sd["port"])
            assert env["ADRENALINE_METRICS_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_scrape_configuration_reaches_every_metrics_port(overlay: str) -> None:
    (job,) = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())["scrape_configs"]
    kept = next(
        r["regex"]
        for r in job["relabel_configs"]
        if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]
    )
    targets = {r["target_label"]: r for r in job["relabel_configs"] if "target_label" in r}
    assert targets["service"]["source_labels"] == ["__meta_kubernetes_pod_container_name"]
    scraped = set()
    for workload in workloads(overlay).values():
        for name, container in containers(workload).items():
            if not is_adrenaline(container):
                continue
            ports = [p["name"] for p in container["ports"] if re.fullmatch(kept, p["name"])]
            assert len(ports) == 1, f"{name}: scraped on {ports}"
            scraped.add(name)
            env = {v["name"]: v.get("value") for v in container.get("env", [])}
            if name != "gateway":  # the endpoint is on, on the scraped port, on the pod's address
                (port,) = [p for p in container["ports"] if p["name"] == ports[0]]
                assert env["ADRENALINE_METRICS_PORT"] == str(port["containerPort"])
                assert env["ADRENALINE_METRICS_HOST"] == "0.0.0.0"
    assert scraped == set(SERVICES)  # container names are the `service` label's values


def test_the_monitoring_compose_file_merges_into_compose_yaml() -> None:
    """`docker compose -f compose.yaml -f deploy/compose.monitoring.yaml` is valid Compose (compose-go,
    as `make compose-config`), and adds the metrics variables without dropping a service's own."""
    import json
    import subprocess

    from tests.deploy.test_k8s import _tool

    files = ["-f", "compose.yaml", "-f", "deploy/compose.monitoring.yaml"]
    result = subprocess.run(
        [_tool("docker-compose"), *files, "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr  # compose-go exits 0 on some errors
    merged = json.loads(result.stdout)["services"]
    alone = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert {"prometheus", "grafana"} <= set(merged)
    for name in SERVICES[1:]:
        service = COMPOSE_SERVICE[name]
        env = _merged_env(merged[service], name)
        assert env["ADRENALINE_METRICS_PORT"] == ("9101" if COMPOSE_PREFIX[name] else "9100"), name
        assert env["ADRENALINE_METRICS_HOST"] == "0.0.0.0"
        assert set(alone[service].get("environment", {})) - {"<<"} <= set(merged[service]["environment"]), name

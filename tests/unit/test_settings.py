"""Settings declared once (common/settings_catalog.py): parsed, checked, documented and used by name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import nats_auth
from common.settings import SettingsError, declared, load, markdown, size
from common.subjects import Subjects
from services.gateway.settings import GatewaySettings
from services.pair import EXECUTOR_PREFIX
from services.runtime import InstanceSettings
from services.scheduler.service import SchedulerSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("268435456", 268435456), ("256MiB", 256 * 2**20), ("1GiB", 2**30), ("1G", 2**30), ("1 gb", 10**9),
     ("2k", 2048), ("1.5KiB", 1536), ("0", 0)],
)  # fmt: skip
def test_sizes_take_units(text: str, expected: int) -> None:
    assert size(text) == expected


@pytest.mark.parametrize("text", ["1X", "", "-1", "1.3", "GiB", "1e9", "1 G B"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        size(text)


def test_flag_over_environment_over_default() -> None:
    env = {"ADRENALINE_MODEL": "/m", "ADRENALINE_KV_CACHE_BYTES": "1GiB", "ADRENALINE_BLOCK_SIZE": "32"}
    settings = load(InstanceSettings, ["--block-size", "8"], "test", env)
    assert (settings.model, settings.kv_cache_bytes, settings.block_size) == ("/m", 2**30, 8)
    assert settings.max_num_seqs == 64  # the catalogue's default


@pytest.mark.parametrize(
    ("cls", "env", "argv", "named"),
    [
        (InstanceSettings, {"ADRENALINE_KV_CACHE_BYTES": "1X"}, [], "ADRENALINE_KV_CACHE_BYTES='1X'"),
        (InstanceSettings, {"ADRENALINE_BLOCK_SIZE": "0"}, [], "ADRENALINE_BLOCK_SIZE=0: must be positive"),
        (InstanceSettings, {}, ["--heartbeat-s", "nan"], "--heartbeat-s='nan'"),
        (InstanceSettings, {"ADRENALINE_INSTANCE_ID": "a.b"}, [], "ADRENALINE_INSTANCE_ID='a.b'"),
        (SchedulerSettings, {"ADRENALINE_OFFLOAD_RATIO": "2"}, [], "ADRENALINE_OFFLOAD_RATIO='2'"),
        (GatewaySettings, {"ADRENALINE_PORT": "70000"}, [], "ADRENALINE_PORT=70000: must be a port"),
        (GatewaySettings, {"ADRENALINE_LOG_LEVEL": "LOUD"}, [], "ADRENALINE_LOG_LEVEL='LOUD'"),
    ],
)
def test_a_bad_value_names_its_variable_or_flag(cls: type, env: dict[str, str], argv: list[str], named: str) -> None:
    with pytest.raises(SettingsError) as bad:
        load(cls, argv, "test", {"ADRENALINE_MODEL": "/m", **env})
    assert named in str(bad.value)


def test_a_missing_required_setting_is_named() -> None:
    with pytest.raises(SettingsError, match="--model or ADRENALINE_MODEL"):
        load(GatewaySettings, [], "test", {})


def test_secrets_stay_out_of_errors_and_reprs() -> None:
    settings = load(GatewaySettings, [], "test", {"ADRENALINE_MODEL": "/m", "ADRENALINE_NATS_PASSWORD": "hunter2"})
    assert settings.nats_password == "hunter2" and "hunter2" not in repr(settings)
    assert "hunter2" not in repr(settings.nats)
    keys = load(GatewaySettings, [], "test", {"ADRENALINE_MODEL": "/m", "ADRENALINE_API_KEYS": "k1, k2,"})
    assert keys.api_keys == ("k1", "k2") and "k1" not in repr(keys)


def test_a_secret_can_come_from_a_mounted_file(tmp_path: Path) -> None:
    secret = tmp_path / "nats-decode"
    secret.write_text("s3cret\n")
    env = {"ADRENALINE_MODEL": "/m", "ADRENALINE_NATS_PASSWORD_FILE": str(secret)}
    assert load(InstanceSettings, [], "test", env).nats_password == "s3cret"
    with pytest.raises(SettingsError, match="ADRENALINE_NATS_PASSWORD_FILE='/nowhere'"):
        load(InstanceSettings, [], "test", {**env, "ADRENALINE_NATS_PASSWORD_FILE": "/nowhere"})
    with pytest.raises(SettingsError, match="required: --model or ADRENALINE_MODEL"):  # only secrets read files
        load(InstanceSettings, [], "test", {"ADRENALINE_MODEL_FILE": str(secret)})


def test_settings_built_in_code_obey_the_same_checks() -> None:
    with pytest.raises(SettingsError, match="ADRENALINE_MAX_NUM_SEQS"):
        InstanceSettings(model="/m", max_num_seqs=0)


def test_a_service_with_a_bad_setting_exits_with_the_message_not_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.scheduler"],
        env={"PATH": "/usr/bin:/bin", "ADRENALINE_DEAD_AFTER_S": "soon"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "bad setting: ADRENALINE_DEAD_AFTER_S='soon'" in result.stderr
    assert "Traceback" not in result.stderr


def test_docs_settings_is_the_generated_table() -> None:
    assert (ROOT / "docs" / "settings.md").read_text() == markdown(), (
        "run: python -m common.settings > docs/settings.md"
    )


def _deploy_names() -> set[str]:
    """Every ADRENALINE_* a deployment gives our services: compose's environment keys and the
    Kubernetes manifests' (not the NATS server's, whose variables its own configuration reads)."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    names = set()
    for spec in compose["services"].values():
        # EXECUTOR_<NAME> is <NAME> for a prefill container's attention executor (services/pair.py)
        keys = {k.removeprefix(EXECUTOR_PREFIX) for k in (spec.get("environment") or {})}
        names |= {k for k in keys if k.startswith("ADRENALINE_")}
    for manifest in (ROOT / "deploy").rglob("*.yaml"):
        if "nats" in manifest.relative_to(ROOT / "deploy").parts:
            continue
        names |= set(re.findall(r"\bname:\s*(ADRENALINE_[A-Z0-9_]+)", manifest.read_text()))
    return names


def test_deployments_set_only_declared_settings() -> None:
    known = set(declared()) | {f"{env}_FILE" for env, (setting, _, _) in declared().items() if setting.secret}
    unknown = _deploy_names() - known
    assert not unknown, f"set in compose.yaml or deploy/ but read by no service: {sorted(unknown)}"


def test_the_deployed_nats_authorization_is_the_generated_one() -> None:
    committed = (ROOT / "deploy" / "k8s" / "base" / "nats" / "auth.conf").read_text()
    assert committed == nats_auth.server_config(None, Subjects()), (
        "run: python -m common.nats_auth > deploy/k8s/base/nats/auth.conf"
    )

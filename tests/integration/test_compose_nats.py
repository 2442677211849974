"""compose.yaml's NATS service, run for real without Docker: its own command, configuration and
secret files (as `make compose-secrets` writes them), on a real nats-server.

Docker is not available here, so the container's paths are mapped to temporary folders and the
port to a free one; everything else is the text compose.yaml runs.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import yaml
from nats.errors import NoServersError

from common import nats_auth
from common.bus import Bus, NatsAuth
from common.messages import AbortRequest
from common.natsd import free_port, nats_server_binary

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(url, secrets folder) of compose's NATS service, started from its compose.yaml entry."""
    tmp = tmp_path_factory.mktemp("compose-nats")
    spec = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["nats"]
    etc, secrets = tmp / "etc", tmp / "secrets"
    etc.mkdir()
    for volume in spec["volumes"]:  # host:container:ro
        host, container = volume.split(":")[:2]
        shutil.copy(ROOT / host, etc / Path(container).name)
    nats_auth.write_secrets(secrets)
    port, monitor = free_port(), free_port()
    assert spec["command"][:2] == ["sh", "-c"]
    script = (
        spec["command"][2]
        .replace("$$", "$")  # compose's escape for a literal $
        .replace("/run/secrets", str(secrets))
        .replace("/etc/nats", str(etc))
        .replace("exec nats-server", f"exec {nats_server_binary()} -a 127.0.0.1 -p {port} -m {monitor}")
    )
    server = subprocess.Popen(["sh", "-c", script], stderr=subprocess.PIPE)
    try:
        healthz = f"http://127.0.0.1:{monitor}/healthz"  # what compose's healthcheck asks
        for _ in range(200):
            try:
                with urllib.request.urlopen(healthz, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}", secrets
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_compose_nats_admits_each_role_with_its_secret_and_no_one_else(compose_nats: tuple[str, Path]) -> None:
    url, secrets = compose_nats
    heard: asyncio.Queue[str] = asyncio.Queue()

    async def on_abort(abort: AbortRequest, reply: object) -> None:
        heard.put_nowait(abort.request_id)

    scheduler = await Bus.connect(url, "s", NatsAuth("scheduler", (secrets / "nats-scheduler").read_text().strip()))
    await scheduler.subscribe("adrenaline.requests.abort", AbortRequest, on_abort)
    await scheduler.flush()
    try:
        decode = await Bus.connect(url, "d", NatsAuth("decode", (secrets / "nats-decode").read_text().strip()))
        await decode.publish("adrenaline.requests.abort", AbortRequest("r-1", "test"))
        await decode.close()
        assert await asyncio.wait_for(heard.get(), 10) == "r-1"
        wrong = (secrets / "nats-gateway").read_text().strip()  # another role's password
        for options in ({}, {"user": "decode", "password": wrong}):
            with pytest.raises((NoServersError, nats.errors.Error, OSError)):
                await nats.connect(url, allow_reconnect=False, connect_timeout=2, **options)
    finally:
        await scheduler.close()


def test_generated_passwords_survive_nats_variable_substitution(tmp_path: Path) -> None:
    """nats-server reads a substituted variable as a configuration value, not as text: some
    passwords `secrets.token_urlsafe` draws (about 1 in 100: a leading '-', a digit then '-')
    do not parse, and the server does not start; ours are a letter and hex digits."""
    conf = tmp_path / "auth.conf"
    conf.write_text(nats_auth.server_config(None, nats_auth.Subjects()))

    def valid(passwords: dict[str, str]) -> bool:
        env = {nats_auth.password_env(user): password for user, password in passwords.items()}
        checked = subprocess.run([nats_server_binary(), "-c", str(conf), "-t"], env=env, capture_output=True)
        return checked.returncode == 0

    assert not valid({user: "1-jdgMxps_utobA4-G1zKN29kDXpH8v5" for user in nats_auth.USERS})  # a token_urlsafe draw
    for _ in range(20):
        passwords = nats_auth.generate_passwords()
        assert all(p[0].isalpha() and p.isalnum() for p in passwords.values())
        assert valid(passwords)

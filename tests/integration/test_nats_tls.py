"""NATS over TLS, as the ADRENALINE_NATS_TLS_* settings configure it, against a real nats-server.

Certificates are made for the test with the openssl command line (a throwaway CA, a server
certificate for 127.0.0.1 and a client certificate); the test is skipped where openssl is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import nats_auth
from common.bus import Bus, NatsAuth
from common.messages import AbortRequest
from common.natsd import NatsServer
from common.subjects import Subjects

SUBJECTS = Subjects("tlstest")
PASSWORDS = nats_auth.generate_passwords()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificate(name: str, subject: str, folder: Path, extension: str) -> None:
    """`name`.pem and `name`.key, signed by the CA in `folder`."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)  # fmt: skip
    (folder / f"{name}.ext").write_text(extension + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=folder)  # fmt: skip
    _certificate("server", "/CN=nats", folder, "subjectAltName=IP:127.0.0.1")
    _certificate("client", "/CN=decode", folder, "extendedKeyUsage=clientAuth")
    return folder


@pytest.fixture(scope="module")
def server(pki: Path) -> Iterator[NatsServer]:
    """nats-server requiring TLS, verifying client certificates, with the per-role users."""
    tls = (
        f'tls {{\n  cert_file: "{pki / "server.pem"}"\n  key_file: "{pki / "server.key"}"\n'
        f'  ca_file: "{pki / "ca.pem"}"\n  verify: true\n}}\n'
    )
    with NatsServer(config=tls + nats_auth.server_config(PASSWORDS, SUBJECTS)) as s:
        yield s


def _auth(user: str, pki: Path, client_certificate: bool = True) -> NatsAuth:
    cert, key = (str(pki / "client.pem"), str(pki / "client.key")) if client_certificate else ("", "")
    return NatsAuth(user, PASSWORDS[user], tls_ca=str(pki / "ca.pem"), tls_cert=cert, tls_key=key)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_services_talk_over_tls_with_a_verified_server_and_client(server: NatsServer, pki: Path) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()

    async def on_abort(abort: AbortRequest, reply: object) -> None:
        heard.put_nowait(abort.request_id)

    scheduler = await Bus.connect(server.url, "scheduler", _auth("scheduler", pki))
    decode = await Bus.connect(server.url, "decode", _auth("decode", pki))
    try:
        await scheduler.subscribe(SUBJECTS.abort, AbortRequest, on_abort)
        await scheduler.flush()
        # Core NATS delivers at most once, and once, in a full-suite run, a single publish was never
        # heard within 10 s (not reproduced in 25 runs of this test beside busy loops on both cores;
        # a connection re-established meanwhile would lose it). What this test holds is that the
        # roles can be heard over TLS at all, so it publishes until heard, and a failure says
        # whether either connection was re-established.
        heard_id = ""
        for _ in range(30):  # a second each
            await decode.publish(SUBJECTS.abort, AbortRequest("over-tls", "test"))  # buffered while reconnecting
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    heard_id = await heard.get()
                    break
        reconnects = {"scheduler": scheduler.client.stats["reconnects"], "decode": decode.client.stats["reconnects"]}
        assert heard_id == "over-tls", f"nothing heard over TLS in 30 s; reconnects: {reconnects}"
    finally:
        await scheduler.close()
        await decode.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("missing", ["tls", "client certificate", "trust in the server"])
async def test_without_what_the_server_requires_a_client_cannot_connect(
    server: NatsServer, pki: Path, missing: str
) -> None:
    auth = {
        "tls": NatsAuth("decode", PASSWORDS["decode"]),
        "client certificate": _auth("decode", pki, client_certificate=False),
        # a CA that did not sign the server's certificate: the client must refuse the server
        "trust in the server": NatsAuth(
            "decode", PASSWORDS["decode"], tls_ca=str(pki / "client.pem"), tls_cert=str(pki / "client.pem"),
            tls_key=str(pki / "client.key"),
        ),
    }[missing]  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises several types for a refused handshake
        bus = await asyncio.wait_for(_connect_once(server.url, auth), 20)
        await bus.close()


async def _connect_once(url: str, auth: NatsAuth) -> Bus:
    """Like `Bus.connect`, without its reconnect-forever policy: a refusal must surface at once."""
    import nats

    client = await nats.connect(url, allow_reconnect=False, connect_timeout=3, **auth.options())
    return Bus(client)

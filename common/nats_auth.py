"""Who may say what on the control plane: one NATS user per role, and each role's subjects.

Without this, any process that reaches NATS can read every prompt and completion, inject tokens
into a stream, abort any request or publish a heartbeat that wins routing. With it, each role
publishes and subscribes only the subjects its code uses (the table below, built from
`Subjects`, so it cannot name a subject the services do not use), replies only to requests it
received (`allow_responses`), and reads replies only under its own inbox prefix.

Roles cannot be narrowed to one instance: instance ids are chosen at start (and grow with
`--scale`), so "instance.*.prefill" is the prefill role's, not prefill-0's. What that leaves
open, and why prefill may publish tokens, is in docs/security.md.

`adrenaline up` makes a password per role for each run (`generate_passwords`); deployments keep
them in secrets, and the server configuration names them as environment references
(`server_config(None, ...)`), which nats-server resolves from its own environment.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.subjects import Subjects

ROLES = ("gateway", "scheduler", "prefill", "decode", "attention_executor")
OBSERVER = "observer"  # `adrenaline status` and `adrenaline up`'s readiness wait: read-only
USERS = (*ROLES, OBSERVER)


def inbox_prefix(user: str) -> str:
    """Where a user's request replies arrive; only that user may subscribe under it."""
    return f"_INBOX_{user}"


def password_env(user: str) -> str:
    """The variable that holds `user`'s password in the NATS server's environment (deployments)."""
    return f"ADRENALINE_NATS_PASSWORD_{user.upper()}"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responds: bool  # answers requests: may publish to the reply subject of a request it received


def permissions(user: str, subjects: Subjects) -> Permissions:
    """What `user` may publish and subscribe; every subject spelled by `Subjects`."""
    s = subjects
    tokens = s.all_tokens  # every gateway's token subject
    liveness = f"{s.prefix}.liveness.>"  # `Hearing`'s echo to itself
    table = {
        "gateway": Permissions((s.submit, s.status, s.abort, s.gateway_heartbeat), (tokens,), responds=False),
        "scheduler": Permissions(
            (s.instance("*", "prefill"), tokens, s.abort, liveness),
            (s.submit, s.status, s.load, s.admitted, s.resume, s.ended, s.abort, liveness, s.gateway_heartbeat),
            responds=True,
        ),
        # The first token is sampled by prefill and goes straight to the gateway (time to first token).
        "prefill": Permissions(
            (s.load_of("prefill"), tokens, s.ended, s.abort, s.instance("*", "handoff")),
            (s.instance("*", "prefill"), s.abort),
            responds=True,
        ),
        "decode": Permissions(
            (
                s.load_of("decode"),
                tokens,
                s.ended,
                s.admitted,
                s.resume,
                s.abort,
                s.instance("*", "release"),
                liveness,
            ),
            (s.instance("*", "handoff"), s.abort, s.load_of("executor"), liveness),
            responds=True,
        ),
        # An executor's failures reach the gateway through the scheduler (an abort), never directly;
        # it hands an offloaded request to its decode instance once the KV has landed.
        "attention_executor": Permissions(
            (s.load_of("executor"), s.abort, s.admitted, s.instance("*", "handoff")),
            (
                s.instance("*", "handoff"),
                s.instance("*", "release"),
                s.abort,
                s.load_of("prefill"),
            ),
            responds=True,
        ),
        OBSERVER: Permissions((s.status,), (s.load,), responds=False),
    }
    granted = table[user]
    return Permissions(granted.publish, (*granted.subscribe, f"{inbox_prefix(user)}.>"), granted.responds)


def generate_password() -> str:
    """192 random bits as a letter and hex digits: nats-server parses an environment variable it
    substitutes as a configuration value, so a password starting with a digit would be read as
    a number (and fail to parse), and `-` or `_` are safest left out of values altogether."""
    return "p" + secrets.token_hex(24)


def generate_passwords() -> dict[str, str]:
    """A fresh random password per user, for one run of a cluster."""
    return {user: generate_password() for user in USERS}


def server_config(passwords: Mapping[str, str] | None, subjects: Subjects) -> str:
    """nats-server's `authorization` block for every user.

    With `passwords`, they are written in (a file only the launcher can read); with None, each is
    an environment reference (`$ADRENALINE_NATS_PASSWORD_GATEWAY`) for deployments that keep the
    passwords in secrets and give them to the server's environment.
    """
    users = []
    for user in USERS:
        grant = permissions(user, subjects)
        password = json.dumps(passwords[user]) if passwords is not None else f"${password_env(user)}"
        rules = [
            f"publish: {{allow: {json.dumps(list(grant.publish))}}}",
            f"subscribe: {{allow: {json.dumps(list(grant.subscribe))}}}",
        ]
        if grant.responds:
            rules.append("allow_responses: true")
        users.append(
            f"    {{user: {json.dumps(user)}, password: {password},\n     permissions: {{{', '.join(rules)}}}}}"
        )
    header = "# Generated by `python -m common.nats_auth`: one user per Adrenaline role (docs/security.md).\n"
    return header + "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def write_credentials(path: Path, user: str, password: str) -> None:
    """`user`'s credentials as an environment file (ADRENALINE_NATS_USER/PASSWORD) only we can read."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(f"ADRENALINE_NATS_USER={user}\nADRENALINE_NATS_PASSWORD={password}\n")


def read_credentials(path: Path) -> tuple[str, str]:
    """(user, password) from a file written by `write_credentials` (or by hand, same format)."""
    values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return values.get("ADRENALINE_NATS_USER", ""), values.get("ADRENALINE_NATS_PASSWORD", "")


def write_secrets(folder: Path) -> list[Path]:
    """A random password per user, one file each (`nats-<user>`, as compose.yaml's secrets name
    them), readable by us alone; files already there are kept, so running it twice changes nothing."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for user, password in generate_passwords().items():
        path = folder / f"nats-{user}"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(password + "\n")
            written.append(path)
    return written


def main(argv: list[str]) -> None:
    """`python -m common.nats_auth [PREFIX]`: the authorization block for deployments, on stdout;
    `--write-secrets FOLDER`: the per-role password files compose.yaml mounts."""
    if argv[:1] == ["--write-secrets"] and len(argv) == 2:
        for path in write_secrets(Path(argv[1])):
            print(f"wrote {path}")
        return
    sys.stdout.write(server_config(None, Subjects(argv[0] if argv else "adrenaline")))


if __name__ == "__main__":
    main(sys.argv[1:])

"""The catalogue: every ADRENALINE_* setting, declared once. Services pick theirs with `field(...)`.

Defaults here are what a service gets with nothing set; `adrenaline up` and compose.yaml set
only what differs for them (instance ids, KV budgets, loopback addresses, credentials).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.bus import NatsAuth
from common.config import parse_offload_ratio
from common.settings import (
    Setting,
    field,
    integer,
    non_negative,
    number,
    one_of,
    port,
    positive,
    prefix_check,
    size,
    subject_token,
    verify,
    words,
)
from common.subjects import Subjects

REQUIRED = dataclasses.MISSING


def _offload_ratio(value: str) -> str | None:
    try:
        parse_offload_ratio(value)
    except ValueError:
        return "must be auto or a number in [0, 1]"
    return None


# ---- every service ---------------------------------------------------------------------------------
NATS_URL = Setting(
    "ADRENALINE_NATS_URL",
    str,
    "nats://127.0.0.1:4222",
    "NATS server(s) to connect to; several comma-separated URLs name a NATS cluster's nodes",
)
NATS_USER = Setting(
    "ADRENALINE_NATS_USER", str, "", "NATS user (each role has its own, see docs/security.md); empty: no auth"
)
NATS_PASSWORD = Setting(
    "ADRENALINE_NATS_PASSWORD", str, "", "the NATS user's password (from a secret, never logged)", secret=True
)
NATS_TLS_CA = Setting(
    "ADRENALINE_NATS_TLS_CA", str, "", "CA bundle that signs the NATS server's certificate; enables TLS", unit="path"
)
NATS_TLS_CERT = Setting(
    "ADRENALINE_NATS_TLS_CERT", str, "", "client certificate, when NATS verifies clients", unit="path"
)
NATS_TLS_KEY = Setting("ADRENALINE_NATS_TLS_KEY", str, "", "the client certificate's private key", unit="path")
SUBJECTS_PREFIX = Setting(
    "ADRENALINE_SUBJECTS_PREFIX",
    str,
    "adrenaline",
    "first tokens of every NATS subject, so that clusters can share a NATS server",
    check=prefix_check,
)
MODEL = Setting("ADRENALINE_MODEL", str, REQUIRED, "a local Hugging Face model folder", unit="path")
METRICS_HOST = Setting(
    "ADRENALINE_METRICS_HOST", str, "127.0.0.1", "address the Prometheus /metrics endpoint binds", unit="address"
)
METRICS_PORT = Setting(
    "ADRENALINE_METRICS_PORT", integer, 0, "port of the Prometheus /metrics endpoint; 0 is off", check=port
)
DEAD_AFTER_S = Setting(
    "ADRENALINE_DEAD_AFTER_S",
    number,
    1.0,
    "a peer silent this long (while NATS itself answers) is declared gone",
    unit="s",
    check=positive,
)
LOG_LEVEL = Setting(
    "ADRENALINE_LOG_LEVEL",
    str.upper,
    "INFO",
    "lowest level logged",
    check=one_of("DEBUG", "INFO", "WARNING", "ERROR"),
)

# ---- prefill, decode and attention executor instances ------------------------------------------------
INSTANCE_ID = Setting(
    "ADRENALINE_INSTANCE_ID",
    str,
    "",
    "unique in the cluster; empty: role-hostname-pid",
    check=subject_token,
)
KV_CACHE_BYTES = Setting(
    "ADRENALINE_KV_CACHE_BYTES", size, 256 * 2**20, "this instance's KV pool", unit="bytes", check=positive
)
BLOCK_SIZE = Setting("ADRENALINE_BLOCK_SIZE", integer, 16, "tokens per KV block", unit="tokens", check=positive)
MAX_NUM_SEQS = Setting("ADRENALINE_MAX_NUM_SEQS", integer, 64, "requests in one batch at most", check=positive)
DEVICE = Setting("ADRENALINE_DEVICE", str, "cpu", "torch device: cpu, cuda, cuda:1")
THREADS = Setting(
    "ADRENALINE_THREADS", integer, 0, "torch threads of this process; 0 keeps torch's default", check=non_negative
)
HEARTBEAT_S = Setting(
    "ADRENALINE_HEARTBEAT_S",
    number,
    0.25,
    "interval of this service's heartbeat (an instance's load, a gateway's liveness)",
    unit="s",
    check=positive,
)
TRANSFER_TIMEOUT_S = Setting(
    "ADRENALINE_TRANSFER_TIMEOUT_S", number, 10.0, "a KV transfer that takes longer fails", unit="s", check=positive
)
COLOCATED_WITH = Setting(
    "ADRENALINE_COLOCATED_WITH",
    str,
    "",
    "an attention executor's prefill instance id (the executor shares its device)",
    check=subject_token,
)
UCX_NET_DEVICES = Setting(
    "ADRENALINE_UCX_NET_DEVICES",
    str,
    "",
    "network devices UCX may listen and connect on (UCX_NET_DEVICES, e.g. lo or eth0); empty: all",
)
UCX_SPIN_US = Setting(
    "ADRENALINE_UCX_SPIN_US",
    number,
    0.0,
    "busy-poll UCX this long before sleeping on its descriptor (trades a core for latency)",
    unit="us",
    check=non_negative,
)

# ---- gateway -----------------------------------------------------------------------------------------
SERVED_MODEL_NAME = Setting(
    "ADRENALINE_SERVED_MODEL_NAME", str, "", "the `model` clients name; empty: the model folder's name"
)
GATEWAY_ID = Setting(
    "ADRENALINE_GATEWAY_ID", str, "", "names this gateway's token subject; empty: random", check=subject_token
)
HOST = Setting("ADRENALINE_HOST", str, "127.0.0.1", "address the HTTP API binds", unit="address")
PORT = Setting("ADRENALINE_PORT", integer, 8000, "port of the HTTP API", check=port)
API_KEYS = Setting(
    "ADRENALINE_API_KEYS", words, (), "comma-separated keys; when set, /v1/* needs `Authorization: Bearer`", secret=True
)
SUBMIT_TIMEOUT_S = Setting(
    "ADRENALINE_SUBMIT_TIMEOUT_S",
    number,
    10.0,
    "the scheduler must accept or refuse within this",
    unit="s",
    check=positive,
)
TOKEN_TIMEOUT_S = Setting(
    "ADRENALINE_TOKEN_TIMEOUT_S",
    number,
    30.0,
    "a request with no token this long fails (504)",
    unit="s",
    check=positive,
)
MAX_CONCURRENT_REQUESTS = Setting(
    "ADRENALINE_MAX_CONCURRENT_REQUESTS",
    integer,
    1024,
    "requests in flight at once; more get 429 with Retry-After; 0: no limit",
    check=non_negative,
)

# ---- scheduler ---------------------------------------------------------------------------------------
REQUEST_TIMEOUT_S = Setting(
    "ADRENALINE_REQUEST_TIMEOUT_S",
    number,
    5.0,
    "how long a prefill instance may take to accept a task",
    unit="s",
    check=positive,
)
OFFLOAD_RATIO = Setting(
    "ADRENALINE_OFFLOAD_RATIO",
    str,
    "auto",
    "`auto` (the load-aware policy) or the fixed share of requests offloaded, in [0, 1]; 0 is plain PD",
    check=_offload_ratio,
)
MAX_QUEUED_REQUESTS = Setting(
    "ADRENALINE_MAX_QUEUED_REQUESTS",
    integer,
    4096,
    "requests the auto policy keeps waiting at the scheduler for room on a decode instance or an executor; "
    "more get 429; 0: none wait there",
    check=non_negative,
)
GATEWAY_DEAD_AFTER_S = Setting(
    "ADRENALINE_GATEWAY_DEAD_AFTER_S",
    number,
    10.0,
    "the scheduler aborts the requests of a gateway silent this long (while NATS itself answers), freeing their KV",
    unit="s",
    check=positive,
)
TPOT_SLO_MS = Setting(
    "ADRENALINE_TPOT_SLO_MS",
    number,
    200.0,
    "the auto policy keeps predicted decode steps under it",
    unit="ms",
    check=positive,
)


@dataclass(frozen=True, kw_only=True)
class ControlPlaneSettings:
    """What every service's settings share: how it reaches NATS, as whom, and its log level.
    Each service's settings class adds its own fields; `__post_init__` checks them all."""

    nats_url: str = field(NATS_URL)
    subjects_prefix: str = field(SUBJECTS_PREFIX)
    nats_user: str = field(NATS_USER)
    nats_password: str = field(NATS_PASSWORD)
    nats_tls_ca: str = field(NATS_TLS_CA)
    nats_tls_cert: str = field(NATS_TLS_CERT)
    nats_tls_key: str = field(NATS_TLS_KEY)
    log_level: str = field(LOG_LEVEL)

    def __post_init__(self) -> None:
        verify(self)

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subjects_prefix)

    @property
    def nats(self) -> NatsAuth:
        return NatsAuth(self.nats_user, self.nats_password, self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)

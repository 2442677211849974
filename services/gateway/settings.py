"""The gateway's settings: one frozen dataclass, filled from CLI flags with ADRENALINE_* environment fallbacks.

Every field has an environment variable so that compose.yaml and `adrenaline up` configure the
gateway exactly as they configure the other services (the same ADRENALINE_NATS_URL,
ADRENALINE_MODEL and ADRENALINE_SUBJECTS_PREFIX); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import dataclass

from common.config import model_name
from common.subjects import Subjects


@dataclass(frozen=True)
class GatewaySettings:
    nats_url: str  # ADRENALINE_NATS_URL
    model: str  # ADRENALINE_MODEL: a local Hugging Face folder; the tokenizer and context length come from it
    served_model_name: str = ""  # ADRENALINE_SERVED_MODEL_NAME: the `model` clients name; "" is the folder's name
    gateway_id: str = ""  # ADRENALINE_GATEWAY_ID (or ADRENALINE_INSTANCE_ID): names our token subject; "" is random
    host: str = "127.0.0.1"  # ADRENALINE_HOST
    port: int = 8000  # ADRENALINE_PORT
    api_keys: tuple[str, ...] = ()  # ADRENALINE_API_KEYS, comma-separated: when set, /v1/* needs a Bearer key
    submit_timeout: float = 10.0  # ADRENALINE_SUBMIT_TIMEOUT_S: the scheduler must accept or refuse within this
    token_timeout: float = 30.0  # ADRENALINE_TOKEN_TIMEOUT_S: a request with no token event this long fails (504)
    # ADRENALINE_MAX_CONCURRENT_REQUESTS: requests in flight at once; more get a 429 with Retry-After (0: no limit)
    max_concurrent_requests: int = 1024
    subjects_prefix: str = "adrenaline"  # ADRENALINE_SUBJECTS_PREFIX
    log_level: str = "INFO"  # ADRENALINE_LOG_LEVEL

    def __post_init__(self) -> None:
        # Derived defaults are filled in here so that every way of building settings agrees on them.
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", model_name(self.model))
        if not self.gateway_id:
            object.__setattr__(self, "gateway_id", f"gateway-{uuid.uuid4().hex[:12]}")
        if "." in self.gateway_id or "*" in self.gateway_id or ">" in self.gateway_id:
            raise ValueError(
                f"gateway_id must not contain '.', '*' or '>' (it is a NATS subject token): {self.gateway_id!r}"
            )
        if self.submit_timeout <= 0 or self.token_timeout <= 0:
            raise ValueError("submit_timeout and token_timeout must be positive")
        if self.max_concurrent_requests < 0:
            raise ValueError(f"max_concurrent_requests must be >= 0 (0: no limit), got {self.max_concurrent_requests}")

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subjects_prefix)

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> GatewaySettings:
        env = os.environ.get
        p = argparse.ArgumentParser(prog="python -m services.gateway", description="The OpenAI-compatible gateway")
        p.add_argument("--nats-url", default=env("ADRENALINE_NATS_URL", "nats://127.0.0.1:4222"))
        p.add_argument("--model", default=env("ADRENALINE_MODEL"), required=env("ADRENALINE_MODEL") is None)
        p.add_argument("--served-model-name", default=env("ADRENALINE_SERVED_MODEL_NAME", ""))
        p.add_argument("--gateway-id", default=env("ADRENALINE_GATEWAY_ID", env("ADRENALINE_INSTANCE_ID", "")))
        p.add_argument("--host", default=env("ADRENALINE_HOST", "127.0.0.1"))
        p.add_argument("--port", type=int, default=int(env("ADRENALINE_PORT", 8000)))
        p.add_argument(
            "--api-key",
            dest="api_keys",
            action="append",
            default=None,
            help="may be given several times; default: ADRENALINE_API_KEYS (comma-separated), none",
        )
        p.add_argument("--submit-timeout", type=float, default=float(env("ADRENALINE_SUBMIT_TIMEOUT_S", 10.0)))
        p.add_argument("--token-timeout", type=float, default=float(env("ADRENALINE_TOKEN_TIMEOUT_S", 30.0)))
        p.add_argument(
            "--max-concurrent-requests", type=int, default=int(env("ADRENALINE_MAX_CONCURRENT_REQUESTS", 1024))
        )
        p.add_argument("--subjects-prefix", default=env("ADRENALINE_SUBJECTS_PREFIX", "adrenaline"))
        p.add_argument("--log-level", default=env("ADRENALINE_LOG_LEVEL", "INFO"))
        args = vars(p.parse_args(argv))
        keys = args["api_keys"] if args["api_keys"] is not None else env("ADRENALINE_API_KEYS", "").split(",")
        args["api_keys"] = tuple(k.strip() for k in keys if k.strip())
        return cls(**args)

"""The gateway's settings: the shared catalogue's declarations it reads (common/settings_catalog.py).

The same ADRENALINE_NATS_URL, ADRENALINE_MODEL and ADRENALINE_SUBJECTS_PREFIX as every other
service, so compose.yaml and `adrenaline up` configure it the same way; a flag given on the
command line wins over the environment.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from common import settings_catalog as catalog
from common.config import model_name
from common.settings import field, load_or_exit


@dataclass(frozen=True, kw_only=True)
class GatewaySettings(catalog.ControlPlaneSettings):
    """The gateway's settings (docs/settings.md)."""

    model: str = field(catalog.MODEL)
    served_model_name: str = field(catalog.SERVED_MODEL_NAME)
    gateway_id: str = field(catalog.GATEWAY_ID)
    host: str = field(catalog.HOST)
    port: int = field(catalog.PORT)
    api_keys: tuple[str, ...] = field(catalog.API_KEYS)
    submit_timeout: float = field(catalog.SUBMIT_TIMEOUT_S)
    token_timeout: float = field(catalog.TOKEN_TIMEOUT_S)
    max_concurrent_requests: int = field(catalog.MAX_CONCURRENT_REQUESTS)
    heartbeat_s: float = field(catalog.HEARTBEAT_S)  # tells the scheduler this gateway is alive

    def __post_init__(self) -> None:
        super().__post_init__()
        # Derived defaults are filled in here so that every way of building settings agrees on them.
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", model_name(self.model))
        if not self.gateway_id:
            object.__setattr__(self, "gateway_id", f"gateway-{uuid.uuid4().hex[:12]}")

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> GatewaySettings:
        """From flags and ADRENALINE_* variables; a bad value exits with a message naming it."""
        settings: GatewaySettings = load_or_exit(cls, argv, "python -m services.gateway")
        return settings

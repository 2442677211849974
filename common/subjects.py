"""Every NATS subject, in one place. Services never spell a subject themselves.

A deployment prefix (`ADRENALINE_NATS_PREFIX`, default "adrenaline") lets several clusters share
one NATS server without hearing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Subjects:
    prefix: str = "adrenaline"

    @property
    def submit(self) -> str:
        """gateway -> scheduler, request/reply, queue group "scheduler"."""
        return f"{self.prefix}.scheduler.submit"

    @property
    def status(self) -> str:
        """anyone -> scheduler, request/reply: `StatusRequest` -> `ClusterStatus`."""
        return f"{self.prefix}.scheduler.status"

    @property
    def load(self) -> str:
        """Every instance's `InstanceLoad` heartbeats (a wildcard: subscribe only, see `load_of`)."""
        return f"{self.prefix}.instances.load.>"

    def load_of(self, role: str) -> str:
        """instances -> scheduler (and peers that watch one role): `InstanceLoad` heartbeats of `role`.
        Per role so that a decode instance watching executors is not woken by every heartbeat."""
        return f"{self.prefix}.instances.load.{role}"

    @property
    def abort(self) -> str:
        """`AbortRequest`, heard by every service that may hold the request."""
        return f"{self.prefix}.requests.abort"

    @property
    def admitted(self) -> str:
        """decode -> scheduler: `Admitted`, a request's KV has landed."""
        return f"{self.prefix}.requests.admitted"

    @property
    def resume(self) -> str:
        """decode -> scheduler: `SubmitRequest` with its output so far, to be placed again (its KV was lost)."""
        return f"{self.prefix}.scheduler.resume"

    @property
    def gateway_heartbeat(self) -> str:
        """gateways -> scheduler: `GatewayHeartbeat`, so that a dead gateway's requests are aborted."""
        return f"{self.prefix}.gateways.heartbeat"

    @property
    def ended(self) -> str:
        """prefill/decode -> scheduler: `RequestsEnded`, the requests that finished or failed there."""
        return f"{self.prefix}.requests.ended"

    @property
    def all_tokens(self) -> str:
        """Every gateway's token subject (a wildcard, for permissions: no service reads them all)."""
        return f"{self.prefix}.gateway.*.tokens"

    def tokens(self, gateway_id: str) -> str:
        """decode/prefill -> the gateway that owns the request: `TokenBatch`."""
        return f"{self.prefix}.gateway.{gateway_id}.tokens"

    def instance(self, instance_id: str, verb: str) -> str:
        """Work addressed to one instance, e.g. instance("prefill-0", "prefill")."""
        return f"{self.prefix}.instance.{instance_id}.{verb}"

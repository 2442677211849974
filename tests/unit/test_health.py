"""/health and /live beside /metrics, for the services without an HTTP API (common/health.py)."""

from __future__ import annotations

import httpx

from common.health import Health, serve
from common.natsd import free_port


def test_health_is_ready_only_while_the_service_marks_itself_and_live_always() -> None:
    health = Health(stale_s=60.0)
    port = free_port()
    serve(port, "127.0.0.1", health)
    base = f"http://127.0.0.1:{port}"
    starting = httpx.get(f"{base}/health", timeout=10)
    assert (starting.status_code, starting.text.strip()) == (503, "starting")
    assert httpx.get(f"{base}/live", timeout=10).status_code == 200
    health.ok()
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    health.not_ok("not connected to NATS")
    down = httpx.get(f"{base}/health", timeout=10)
    assert (down.status_code, down.text.strip()) == (503, "not connected to NATS")
    assert "python_info" in httpx.get(f"{base}/metrics", timeout=10).text  # Prometheus still served


def test_a_mark_that_is_not_renewed_goes_stale() -> None:
    health = Health(stale_s=0.0)
    health.ok()
    ok, why = health.status()
    assert not ok and why.startswith("no sign of work")

"""/health and /live for the services without an HTTP API of their own (scheduler, prefill,
decode, attention executor), beside /metrics on their metrics port.

An orchestrator needs both: liveness says the process answers at all (restart it if not),
readiness says it is part of the cluster now: its NATS connection works and its periodic work
(an instance's heartbeat, the scheduler's liveness round trip) ran recently. A process whose
event loop is stuck stops marking itself healthy and turns 503 within `stale_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app


class Health:
    """Marked by the service's own loop; read by the HTTP thread (a float and a string: no lock)."""

    def __init__(self, stale_s: float = 5.0) -> None:
        self.stale_s = stale_s
        self._ok_at: float | None = None
        self._why = "starting"

    def ok(self) -> None:
        self._ok_at = time.monotonic()

    def not_ok(self, why: str) -> None:
        self._ok_at, self._why = None, why

    def status(self) -> tuple[bool, str]:
        ok_at = self._ok_at
        if ok_at is None:
            return False, self._why
        if time.monotonic() - ok_at > self.stale_s:
            return False, f"no sign of work for {time.monotonic() - ok_at:.1f} s"
        return True, "ok"


HEALTH = Health()  # one per process: each service process is one service


def app(health: Health) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """A WSGI app: /live, /health, and Prometheus's /metrics for every other path."""
    metrics = make_wsgi_app()

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/live":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"alive\n"]
        if path == "/health":
            ok, why = health.status()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return serve


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a line
        pass


def serve(port: int, host: str, health: Health = HEALTH) -> None:
    """Serve /metrics, /health and /live on `host`:`port` from a daemon thread."""
    server = make_server(host, port, app(health), server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()

"""The gateway's request-level Prometheus metrics: what a user of the API experiences.

Each app gets its own registry rather than prometheus_client's global one, so that several
gateways can live in one process (the tests run two) without clashing metric names. Requests
are counted by an ASGI middleware, which sees the status actually sent whichever path produced
it (a handler, a guard, Litestar's validation, an exception handler).
"""

from __future__ import annotations

import time

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/live",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/version",
)


class GatewayMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adrenaline_gateway_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "adrenaline_gateway_inflight_requests", "Generation requests being served", registry=self.registry
        )
        self.ttft = Histogram(
            "adrenaline_gateway_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "adrenaline_gateway_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "adrenaline_gateway_request_seconds",
            "From the request's arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "adrenaline_gateway_tokens", "Tokens by kind (prompt, completion)", ["kind"], registry=self.registry
        )
        # The same observations under vLLM's names and `model_name` label, for dashboards built for vLLM.
        self.vllm = VllmRequestMetrics(self.registry, model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Count each HTTP request by its route and the status it was answered with."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            status = 500  # if the app fails before answering, the server answers 500

            async def watch(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, watch)
            finally:
                self.requests.labels(endpoint, str(status)).inc()

        return counted


class VllmRequestMetrics:
    """vLLM's request-level metric names (`vllm:*`), observed where ours are."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token (vLLM's name)", labels,
            buckets=_LATENCY_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Mean time per output token after the first (vLLM's name)", labels,
            buckets=_TPOT_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency (vLLM's name)", labels,
            buckets=_LATENCY_BUCKETS, registry=registry,
        ).labels(model_name)  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens (vLLM's name)", labels, registry=registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens (vLLM's name)", labels, registry=registry
        ).labels(model_name)


class RequestTimer:
    """A generation request's timings: TTFT at its first token, TPOT and end-to-end at its end."""

    def __init__(self, metrics: GatewayMetrics, prompt_tokens: int, start: float) -> None:
        self.metrics = metrics
        self.start = start  # time.perf_counter() at the request's arrival
        self.first: float | None = None
        self.tokens = 0
        metrics.tokens.labels("prompt").inc(prompt_tokens)
        metrics.vllm.prompt_tokens.inc(prompt_tokens)

    def tokens_arrived(self, n: int) -> None:
        if n and self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.start)
            self.metrics.vllm.ttft.observe(self.first - self.start)
        self.tokens += n
        self.metrics.tokens.labels("completion").inc(n)
        self.metrics.vllm.generation_tokens.inc(n)

    def finished(self) -> None:
        end = time.perf_counter()
        self.metrics.e2e.observe(end - self.start)
        self.metrics.vllm.e2e.observe(end - self.start)
        if self.first is not None and self.tokens > 1:
            tpot = (end - self.first) / (self.tokens - 1)
            self.metrics.tpot.observe(tpot)
            self.metrics.vllm.tpot.observe(tpot)

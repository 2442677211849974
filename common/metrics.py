"""Prometheus metrics of the engine-side services, named and documented in one place.

Each prefill and decode process serves them on `ADRENALINE_METRICS_PORT` (0 turns the endpoint
off); the gateway serves its own request-level metrics (TTFT, TPOT) on its `/metrics`.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from common.config import model_name

KV_BLOCKS_TOTAL = Gauge("adrenaline_kv_blocks_total", "KV blocks in this instance's pool")
KV_BLOCKS_USED = Gauge("adrenaline_kv_blocks_used", "KV blocks held by requests")
RUNNING = Gauge("adrenaline_running_requests", "Requests in the running batch")
WAITING = Gauge("adrenaline_waiting_requests", "Requests queued (or KV in flight) on this instance")
STEP_SECONDS = Histogram(
    "adrenaline_step_seconds",
    "Time of one engine step (a prefill batch or a decode token for the whole batch)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BATCH_SIZE = Histogram(
    "adrenaline_batch_size", "Requests in one engine step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
TRANSFER_BYTES = Counter("adrenaline_kv_transfer_bytes_total", "KV bytes moved over UCX", ["direction"])
UCX_ORPHANS = Gauge(
    "adrenaline_ucx_orphaned_transfers",
    "Timed-out UCX transfers still posted, with the memory they may write (common/tensor_channel.py)",
)
UCX_ORPHANS_EXPIRED = Counter(
    "adrenaline_ucx_orphaned_transfers_expired_total",
    "Timed-out UCX transfers given up on and cancelled: unfinished after the TTL, or the oldest past the cap",
    ["reason"],
)
TRANSFER_SECONDS = Histogram(
    "adrenaline_kv_transfer_seconds",
    "Time to move one request's KV (from the hand-off message to the last byte)",
    ["direction"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
# The offload round trip and the local attention that hides it, per layer, on one scale.
_PER_LAYER_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
LAYER_ROUND_TRIP_SECONDS = Histogram(
    "adrenaline_offload_layer_round_trip_seconds",
    "Decode side, per layer and executor: from posting q/k/v to the step thread seeing the "
    "executor's answer, which it looks for after its local attention (an answer that came during "
    "it reads as that long; the exposed part is the stall)",
    buckets=_PER_LAYER_BUCKETS,
)
LOCAL_ATTENTION_SECONDS = Histogram(
    "adrenaline_offload_local_attention_seconds",
    "Decode side, per layer of a step with offloaded rows: local attention time, the window that "
    "hides the executors' round trip",
    buckets=_PER_LAYER_BUCKETS,
)
OFFLOAD_STALL_SECONDS = Histogram(
    "adrenaline_offload_stall_seconds",
    "Decode side, per step with offloaded rows: time spent waiting on executors after local "
    "attention, summed over layers (remote time not hidden; 0 is the goal)",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
EXECUTOR_ATTENTION_BYTES = Counter(
    "adrenaline_executor_attention_bytes_total",
    "Executor side: KV bytes read by decode attention (rate() of it is the executor's bandwidth)",
)
EXECUTOR_STEP_SECONDS = Histogram(
    "adrenaline_executor_step_seconds",
    "Executor side: one decode instance's step here, busy time only (storing k/v and attention, "
    "summed over layers; the waits for each layer's q/k/v and the sends excluded)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
EXECUTOR_SLOWDOWN = Gauge(
    "adrenaline_executor_attention_slowdown",
    "Executor side: recent steps' attention time over what the start-up profile predicts (1: as "
    "profiled; above 1: the colocated prefill takes its share); scales the bandwidth it reports",
)
EXECUTOR_EVICTIONS = Counter(
    "adrenaline_executor_evictions_total",
    "Executor side: offloaded requests handed back to their decode instance because a step found "
    "no free block for them (the decode instance resumes them elsewhere: adrenaline_decode_resumed_total)",
)
DECODE_ROWS = Counter(
    "adrenaline_decode_rows_total",
    "Decode side: request-steps decoded, by where their attention ran (the offloaded share over "
    "any window is the ratio of their rates)",
    ["attention"],
)
OFFLOADED_SHARE = Gauge("adrenaline_offloaded_share", "Share of the decode batch whose attention runs on executors")
PREEMPTIONS = Counter(
    "adrenaline_preemptions_total",
    "Running requests whose KV was dropped for lack of blocks, to be recomputed (a full cache slows, never fails)",
)
HANDOFFS_RECOMPUTED = Counter(
    "adrenaline_decode_handoffs_recomputed_total",
    "Hand-offs that found no room within the hold time: queued to recompute their KV here, not sent",
)
RESUMED = Counter(
    "adrenaline_decode_resumed_total",
    "Decode side: requests an executor handed back (full), sent back to the scheduler with their "
    "output so far, to be recomputed on a prefill instance and placed again",
)
TRANSFER_FAILURES = Counter("adrenaline_kv_transfer_failures_total", "KV transfers that failed or timed out")


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics, and /health and /live (common/health.py), on `host`:`port` in a background
    thread; port 0 means off. Loopback unless told otherwise: metrics name models and load,
    nothing a stranger on the network should read."""
    if port:
        from common import health

        health.serve(port, host)


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)


# vLLM's names for the same gauges, so that dashboards built for vLLM show an Adrenaline cluster.
# Requests are counted once across the cluster: running where they decode (an offloaded request
# is on its decode instance's books too, so executors report none), waiting wherever they queue.
VLLM_RUNNING = Gauge("vllm:num_requests_running", "Requests decoding (vLLM's name)", ["model_name"])
VLLM_WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting for their turn (vLLM's name)", ["model_name"])
VLLM_KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "Share of this instance's KV blocks in use, 0-1", ["model_name"])
_model_name = ""


def name_model(model: str) -> None:
    """The `model_name` label of the vLLM-named gauges: the model folder's name, which the gateway
    also serves it as unless `--served-model-name` says otherwise."""
    global _model_name
    _model_name = model_name(model)


def observe_pool(role: str, total: int, free: int, running: int, waiting: int) -> None:
    KV_BLOCKS_TOTAL.set(total)
    KV_BLOCKS_USED.set(total - free)
    RUNNING.set(running)
    WAITING.set(waiting)
    VLLM_RUNNING.labels(_model_name).set(running if role == "decode" else 0)
    VLLM_WAITING.labels(_model_name).set(waiting if role != "executor" else 0)
    VLLM_KV_USAGE.labels(_model_name).set((total - free) / total if total else 0.0)


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A process's Prometheus samples, as {'name{labels}': value}: for tests and the benchmark."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values

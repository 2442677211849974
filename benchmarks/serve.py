"""Serving benchmark: plain PD vs Adrenaline offloading, side by side in one run.

For each mode (an offload ratio; 0 is plain PD disaggregation) it starts a LocalCluster, sends
one seeded workload through the OpenAI completions API (streaming), and measures per request
the time to first token (TTFT), inter-token latencies (ITL), time per output token
(TPOT = (e2e - ttft) / (output_tokens - 1)) and end-to-end latency; per mode the output and
request throughput, latency statistics and goodput under a TPOT SLO, under the names
`vllm bench serve` gives them (`output_throughput`, `median_ttft_ms`, `p99_tpot_ms`, ...), so
that results of both read alike. While the workload runs it listens to the cluster's own
heartbeats (decode batch size, offloaded requests over time; nothing extra is asked of the
instances), and after each mode it scrapes the decode instances' Prometheus metrics (mean decode
batch size, offloaded share, per-layer offload round trip, step time). The results go to one
JSON file, and plots of them (benchmarks/plots.py) to PNG files beside it.

Everything runs on one CPU machine, so absolute numbers mean little: what matters is the
ratio between modes measured with the same workload, machine and pinning. The decode KV
budget defaults to room for ~16 average requests (`--decode-kv-requests`) so that the decode
batch is bounded by memory capacity, which is the regime Adrenaline targets (offloaded requests
keep their KV on the executors, so the decode instance can batch more). Offloading pays where a
bigger batch costs little more per step: where the step reads weights rather than computes.
The embedded default model computes (its GEMMs at batch 9 already take longer than reading its
15 MB of weights); `--preset memory-bound` makes a model in the paper's regime.

Workloads (approximations, not the datasets):
- "sharegpt": lognormal lengths; prompt median 160 (sigma 0.9, capped 1024), output median
  120 (sigma 0.8, capped 512), roughly the shape of ShareGPT conversations.
- "long-output": prompts ~64 (normal, sd 16), outputs uniform in [400, 800].
- "tiny": prompts 8-32, outputs 4-16 (smoke tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openai
from tqdm import tqdm

from common.config import parse_offload_ratio

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription

    from common.bus import Bus
    from common.subjects import Subjects
    from services.local_cluster import LocalCluster

# Per-request latency series and the statistics reported for each, named as `vllm bench serve`
# names them: f"{stat}_{series}_ms", e.g. "median_ttft_ms", "p99_tpot_ms".
LATENCY_SERIES = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)
HEARTBEAT_S = 0.25  # the instances' heartbeat interval (ADRENALINE_HEARTBEAT_S's default)


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    arrival_s: float  # offset from the start of the run


@dataclass
class Record:
    prompt_tokens: int
    max_tokens: int
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    tpot_s: float = math.nan
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    retries: int = 0
    error: str | None = None


def draw_lengths(dist: str, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    if dist == "sharegpt":
        p = np.minimum(rng.lognormal(math.log(160), 0.9, n), 1024)
        o = np.minimum(rng.lognormal(math.log(120), 0.8, n), 512)
    elif dist == "long-output":
        p = np.clip(rng.normal(64, 16, n), 16, 128)
        o = rng.uniform(400, 800, n)
    elif dist == "tiny":
        p = rng.uniform(8, 32, n)
        o = rng.uniform(4, 16, n)
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return [(max(int(a), 1), max(int(b), 2)) for a, b in zip(p, o, strict=True)]


def make_workload(dist: str, n: int, rate: float, vocab: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    lengths = draw_lengths(dist, n, rng)
    gaps = rng.exponential(1.0 / rate, n) if math.isfinite(rate) else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [
        Request(rng.integers(3, vocab, p).tolist(), o, float(t)) for (p, o), t in zip(lengths, arrivals, strict=True)
    ]


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * 4  # float32 K and V


async def send(client: openai.AsyncOpenAI, model: str, req: Request, t0: float, bar: tqdm) -> Record:
    rec = Record(len(req.prompt), req.max_tokens)
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    start = time.perf_counter()
    try:
        while True:
            try:
                stream = await client.completions.create(
                    model=model,
                    prompt=req.prompt,
                    max_tokens=req.max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                break
            except openai.RateLimitError:  # every decode instance full right now: wait, retry
                rec.retries += 1
                await asyncio.sleep(0.1)
        chunk_times: list[float] = []
        async for chunk in stream:
            if chunk.usage is not None:
                rec.output_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                chunk_times.append(time.perf_counter())
        end = time.perf_counter()
        if not chunk_times:
            raise RuntimeError("no tokens streamed")
        rec.ttft_s, rec.e2e_s = chunk_times[0] - start, end - start
        # a chunk may carry several tokens: spread each gap over the tokens it delivered
        per_chunk = max(rec.output_tokens - 1, 1) / max(len(chunk_times) - 1, 1)
        for a, b in itertools.pairwise(chunk_times):
            rec.itl_s.extend([(b - a) / per_chunk] * max(round(per_chunk), 1))
        if rec.output_tokens > 1:
            rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)
    except Exception as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    bar.update(1)
    return rec


def progress(total: int, label: str) -> tqdm:
    """A progress bar on a terminal only: redirected to a file or a CI log, tqdm's redraws
    would be hundreds of lines of noise around the results."""
    return tqdm(total=total, desc=label, unit="req", disable=not sys.stderr.isatty())


async def run_workload(url: str, model: str, workload: list[Request], label: str) -> tuple[list[Record], float, float]:
    """Send the workload; returns the records, the start (`time.perf_counter()`) and the wall time."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    with progress(len(workload), label) as bar:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(send(client, model, r, t0, bar) for r in workload))
        wall = time.perf_counter() - t0
    await client.close()
    return list(records), t0, wall


class ClusterSampler:
    """Records what the cluster says about itself while the workload runs, for the timeline plot.

    It joins the cluster's NATS as one more listener, as `adrenaline status` does: every
    instance's `InstanceLoad` heartbeat (every 0.25 s; a decode instance's `running` is its
    batch, an executor's the offloaded requests it holds) and, once a second, the scheduler's
    `ClusterStatus` (requests in flight). The heartbeats are sent anyway, so listening costs the
    cluster nothing; the status request is one small message a second. Times are
    `time.perf_counter()` values, made relative to the workload's start by `timeline`.
    """

    def __init__(self, bus: Bus, subjects: Subjects, status_every_s: float = 1.0) -> None:
        self.bus = bus
        self.subjects = subjects
        self.status_every_s = status_every_s
        self.loads: list[dict[str, Any]] = []
        self.inflight: list[tuple[float, int]] = []
        self.subscription: Subscription | None = None
        self.poller: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, connect: Callable[[], Awaitable[Bus]], prefix: str) -> ClusterSampler:
        from common.messages import InstanceLoad
        from common.subjects import Subjects

        sampler = cls(await connect(), Subjects(prefix))

        async def on_load(load: InstanceLoad, reply: object) -> None:
            sampler.loads.append(
                {
                    "t": time.perf_counter(),
                    "instance": load.instance_id,
                    "role": load.role,
                    "running": load.running,
                    "waiting": load.waiting,
                    "kv_used": load.total_blocks - load.free_blocks,
                    "kv_total": load.total_blocks,
                }
            )

        sampler.subscription = await sampler.bus.subscribe(sampler.subjects.load, InstanceLoad, on_load)
        sampler.poller = asyncio.create_task(sampler._poll_status())
        return sampler

    async def _poll_status(self) -> None:
        from common.bus import ServiceUnavailable
        from common.messages import ClusterStatus, StatusRequest

        while True:
            try:
                status = await self.bus.request(self.subjects.status, StatusRequest(), ClusterStatus, 1.0)
                self.inflight.append((time.perf_counter(), status.inflight))
            except ServiceUnavailable:  # a busy or restarting scheduler: a gap in the line, not a failure
                pass
            await asyncio.sleep(self.status_every_s)

    async def settle(self) -> None:
        """Wait, at most two heartbeat intervals, for a decode heartbeat sent after now: the
        timeline then ends where the run does, and a run shorter than one interval still has one."""
        since = time.perf_counter()
        deadline = since + 2 * HEARTBEAT_S
        while time.perf_counter() < deadline:
            if any(b["role"] == "decode" and b["t"] > since for b in self.loads):
                return
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        if self.subscription is not None:
            await self.subscription.unsubscribe()
        await self.bus.close()

    def timeline(self, t0: float) -> dict[str, list[dict[str, Any]]]:
        """The samples with times in seconds from `t0` (the workload's start), as stored in the JSON."""
        return {
            "loads": [{**beat, "t": round(beat["t"] - t0, 4)} for beat in self.loads],
            "inflight": [{"t": round(t - t0, 4), "inflight": n} for t, n in self.inflight],
        }


async def measure(
    url: str, model: str, workload: list[Request], label: str, connect: Callable[[], Awaitable[Bus]], prefix: str
) -> tuple[list[Record], float, dict[str, list[dict[str, Any]]]]:
    """Run the workload with a `ClusterSampler` listening; returns the records, wall time and
    timeline. A sampler that cannot join NATS costs the run its timeline, not its figures."""
    try:
        sampler: ClusterSampler | None = await ClusterSampler.start(connect, prefix)
    except Exception as exc:
        print(f"warning: not listening to the cluster, no timeline for {label}: {exc}", file=sys.stderr)
        sampler = None
    try:
        records, t0, wall = await run_workload(url, model, workload, label)
        if sampler is not None:
            await sampler.settle()
    finally:
        if sampler is not None:
            await sampler.stop()
    return records, wall, sampler.timeline(t0) if sampler is not None else {"loads": [], "inflight": []}


def observer(cluster: LocalCluster) -> Callable[[], Awaitable[Bus]]:
    """How the benchmark joins a cluster's NATS to listen: as its read-only observer user, which
    may request the scheduler's status and hear heartbeats, nothing else (common/nats_auth.py)."""
    from common import nats_auth
    from common.bus import Bus

    assert cluster.nats is not None, "the cluster is started"
    url, auth = cluster.nats.url, cluster.credentials(nats_auth.OBSERVER)
    return lambda: Bus.connect(url, "adrenaline-bench", auth)


def decode_timeline(timeline: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Decode batch size and offloaded share over time, one point per decode heartbeat.

    At each decode heartbeat the batch is the sum of every decode instance's latest `running`,
    and the offloaded share the executors' latest `running` (the offloaded requests they hold)
    over that batch. The two come from different heartbeats, up to one beat apart, so the share
    is clamped to 1 and undefined (NaN, a gap in the plot) while the batch is empty.
    """
    latest: dict[str, dict[str, Any]] = {}
    out: dict[str, list[float]] = {"t": [], "batch": [], "offloaded": [], "offloaded_share": []}
    for beat in sorted(timeline.get("loads", []), key=lambda b: float(b["t"])):
        latest[beat["instance"]] = beat
        if beat["role"] != "decode":
            continue
        batch = sum(b["running"] for b in latest.values() if b["role"] == "decode")
        offloaded = sum(b["running"] for b in latest.values() if b["role"] == "executor")
        out["t"].append(float(beat["t"]))
        out["batch"].append(float(batch))
        out["offloaded"].append(float(min(offloaded, batch)))
        out["offloaded_share"].append(min(1.0, offloaded / batch) if batch else math.nan)
    return out


def scrape(ports: dict[str, int], role: str) -> dict[str, float]:
    """Sum the samples of every instance of `role` (by instance-id prefix) per sample name."""
    from common.metrics import scrape_metrics

    totals: dict[str, float] = {}
    for name, port in ports.items():
        if name.startswith(role):
            for key, value in scrape_metrics(port).items():
                totals[key] = totals.get(key, 0.0) + value
    return totals


def decode_summary(m: dict[str, float], executors: dict[str, float], wall: float) -> dict[str, float]:
    def mean(name: str) -> float:
        count = m.get(f"{name}_count", 0.0)
        return m.get(f"{name}_sum", 0.0) / count if count else math.nan

    local = m.get('adrenaline_decode_rows_total{attention="local"}', 0.0)
    offloaded = m.get('adrenaline_decode_rows_total{attention="offloaded"}', 0.0)
    return {
        "mean_batch_size": mean("adrenaline_batch_size"),
        "offloaded_share": offloaded / (local + offloaded) if local + offloaded else math.nan,
        "round_trip_ms": 1e3 * mean("adrenaline_offload_layer_round_trip_seconds"),
        "local_attention_ms": 1e3 * mean("adrenaline_offload_local_attention_seconds"),
        "stall_ms": 1e3 * mean("adrenaline_offload_stall_seconds"),
        "step_ms": 1e3 * mean("adrenaline_step_seconds"),
        "executor_gb_s": executors.get("adrenaline_executor_attention_bytes_total", 0.0) / wall / 1e9,
    }


def latency_stats(name: str, values_s: list[float]) -> dict[str, float]:
    """mean, median, std and percentiles of one latency series in ms, under vLLM's key names
    (NaN where there are no values: vLLM reports 0 there, which reads as a measurement)."""
    ms = 1e3 * np.asarray(values_s, dtype=float)
    empty = ms.size == 0
    out = {
        f"mean_{name}_ms": math.nan if empty else float(np.mean(ms)),
        f"median_{name}_ms": math.nan if empty else float(np.median(ms)),
        f"std_{name}_ms": math.nan if empty else float(np.std(ms)),
    }
    for q in PERCENTILES:
        out[f"p{q}_{name}_ms"] = math.nan if empty else float(np.percentile(ms, q))
    return out


def summarize(records: list[Record], wall: float, tpot_slo_s: float) -> dict[str, float]:
    """One run's figures. Where `vllm bench serve` reports the same quantity, the key is its
    name (totals and throughputs over successful requests, `duration` the wall time, `failed`
    the requests that ended in an error; goodput counts requests within the TPOT SLO); the
    others (`rate_limited_retries`, and `kv_blocks_left` added by `run_mode`) are ours."""
    ok = [r for r in records if r.error is None]
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    out: dict[str, float] = {
        "duration": wall,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / wall,
        "request_goodput": sum(1 for r in ok if not r.tpot_s > tpot_slo_s) / wall,
        "output_throughput": total_output / wall,
        "total_token_throughput": (total_input + total_output) / wall,
        "rate_limited_retries": sum(r.retries for r in records),  # 429s answered by waiting 100 ms
    }
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [r.tpot_s for r in ok if not math.isnan(r.tpot_s)],
        "itl": [x for r in ok for x in r.itl_s],
        "e2el": [r.e2e_s for r in ok],
    }
    for name in LATENCY_SERIES:
        out.update(latency_stats(name, series[name]))
    return out


def kv_left(ports: dict[str, int], wait_s: float = 5.0) -> int:
    """KV blocks still held on any prefill, decode or executor instance once the workload is over
    (0 is the only right answer); the gauges follow heartbeats, so give them a moment."""
    from common.metrics import scrape_metrics

    deadline = time.monotonic() + wait_s
    while True:
        used = sum(
            int(scrape_metrics(port).get("adrenaline_kv_blocks_used", 0.0))
            for name, port in ports.items()
            if name.startswith(("prefill", "decode", "executor"))
        )
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.25)


def run_mode(
    args: argparse.Namespace,
    model: Path,
    ratio: str,
    workload: list[Request],
    kv: int,
    rep: int,
    executor_kv: int | None = None,
) -> dict[str, Any]:
    from common.natsd import free_port
    from services.local_cluster import LocalCluster

    pin = {"decode": {0}, "prefill": {1}, "attention-executor": {1}} if len(os.sched_getaffinity(0)) >= 2 else {}
    cluster = LocalCluster(
        model=model,
        port=free_port(),
        pin=pin,
        env={"ADRENALINE_THREADS": "1"},
        log_dir=Path(args.out).parent / f"logs-{ratio}-{rep}",
        offload_ratio=ratio,
        tpot_slo_ms=args.tpot_slo_ms,
        kv_cache_bytes=kv,
        executor_kv_cache_bytes=executor_kv,
        prefill_nice=args.prefill_nice,
    )
    cluster.start()
    try:
        cluster.wait_ready()
        records, wall, timeline = asyncio.run(
            measure(cluster.url, model.name, workload, f"ratio {ratio} #{rep}", observer(cluster), cluster.prefix)
        )
        decode = decode_summary(
            scrape(cluster.metrics_ports, "decode"), scrape(cluster.metrics_ports, "executor"), wall
        )
        policy = {
            k: v
            for k, v in scrape(cluster.metrics_ports, "scheduler").items()
            if k.startswith(("adrenaline_scheduler_offload_bound{", "adrenaline_scheduler_offload_decisions_total{"))
        }
        leftover = kv_left(cluster.metrics_ports)
    finally:
        cluster.stop()
    return {
        "summary": {**summarize(records, wall, args.tpot_slo_ms / 1e3), "kv_blocks_left": float(leftover)},
        "decode": decode,
        "policy": policy,  # the scheduler's offload bounds and decisions by reason
        "timeline": timeline,  # heartbeats and in-flight counts heard during the run
        "records": [asdict(r) for r in records],
    }


def median_summary(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {k: statistics.median(run[key][k] for run in runs) for k in runs[0][key]}


# The per-mode table: the serving figures, then the decode instances' (from their metrics).
SUMMARY_COLUMNS = (
    "output_throughput",
    "request_throughput",
    "request_goodput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_itl_ms",
    "median_e2el_ms",
    "failed",
    "kv_blocks_left",
)
DECODE_COLUMNS = (
    "mean_batch_size",
    "offloaded_share",
    "round_trip_ms",
    "local_attention_ms",
    "stall_ms",
    "step_ms",
    "executor_gb_s",
)


def render_modes(modes: dict[str, dict[str, Any]]) -> list[str]:
    """The per-mode table (Markdown), medians over repeats."""
    cols = [*SUMMARY_COLUMNS, *DECODE_COLUMNS]
    lines = ["| mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for mode, res in modes.items():
        vals = [res["summary"][c] for c in SUMMARY_COLUMNS] + [res["decode"][c] for c in DECODE_COLUMNS]
        lines.append(f"| {mode} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return lines


def throughput_ratios(modes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each mode's output throughput over the first mode's (NaN if the first produced nothing,
    as when all its requests failed: the run still gets its JSON and plots)."""
    first, *others = modes
    base = modes[first]["summary"]["output_throughput"]
    return {m: modes[m]["summary"]["output_throughput"] / base if base else math.nan for m in others}


def ratio_curve(modes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's curve: output throughput against the offload ratio, fixed ratios in ascending
    order, then `auto` (its ratio is its own choice: `offloaded_share` is what it measured).
    `relative` is against the fixed ratio 0 (plain PD) when it was run, else the lowest ratio.
    Empty unless at least two fixed ratios were run: one point is not a curve."""
    fixed = sorted((r, m) for m in modes if (r := parse_offload_ratio(m)) is not None)
    if len(fixed) < 2:
        return []
    order = [m for _, m in fixed] + [m for m in modes if parse_offload_ratio(m) is None]
    base = modes[fixed[0][1]]["summary"]["output_throughput"]
    rows = []
    for mode in order:
        summary, decode = modes[mode]["summary"], modes[mode]["decode"]
        rows.append(
            {
                "mode": mode,
                "offload_ratio": parse_offload_ratio(mode),  # None: auto
                "offloaded_share": decode.get("offloaded_share", math.nan),
                "output_throughput": summary["output_throughput"],
                "relative": summary["output_throughput"] / base if base else math.nan,
                "median_tpot_ms": summary["median_tpot_ms"],
                "p99_ttft_ms": summary["p99_ttft_ms"],
            }
        )
    return rows


def render_ratio_curve(curve: list[dict[str, Any]]) -> list[str]:
    """`ratio_curve` as a Markdown table."""
    if not curve:
        return []
    base = next(row["mode"] for row in curve if row["offload_ratio"] is not None)
    lines = [
        f"| offload ratio | offloaded share | output_throughput | vs {base} | median_tpot_ms | p99_ttft_ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in curve:
        ratio = "auto" if row["offload_ratio"] is None else f"{row['offload_ratio']:g}"
        lines.append(
            f"| {ratio} | {row['offloaded_share']:.2f} | {row['output_throughput']:.1f} | {row['relative']:.2f}x "
            f"| {row['median_tpot_ms']:.1f} | {row['p99_ttft_ms']:.0f} |"
        )
    return lines


def plot_paths(out: Path, plots_dir: Path | None) -> Path:
    """Where plots go: `--plots-dir`, or beside the results JSON; files are named after it."""
    return (plots_dir or out.parent) / out.stem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adrenaline bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF folder; default: a made model of --preset in a temp dir")
    p.add_argument(
        "--preset",
        choices=("default", "memory-bound"),
        default="default",
        help="the made model's shape: the embedded default, or one whose decode step reads its weights\n"
        "at the batch sizes a small KV cache allows, as an LLM's does on a GPU (docs/benchmarks.md)",
    )
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--dist", choices=("sharegpt", "long-output", "tiny"), default="sharegpt")
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--modes",
        default="0,auto",
        help="comma-separated offload ratios ('auto' or in [0, 1]); two or more fixed ratios also give\n"
        "the throughput-against-ratio curve, e.g. 0,0.25,0.5,0.75,1,auto",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--prefill-nice", type=int, default=0, help="niceness of a prefill beside an executor (adrenaline up's)"
    )
    p.add_argument("--tpot-slo-ms", type=float, default=200.0, help="goodput's SLO, and the auto policy's")
    p.add_argument("--decode-kv-bytes", type=int, default=None, help="default: room for --decode-kv-requests")
    p.add_argument(
        "--decode-kv-requests", type=float, default=16.0, help="decode KV budget in average requests of the workload"
    )
    p.add_argument(
        "--executor-kv-requests",
        type=float,
        default=None,
        help="each executor's KV budget in average requests (default: the decode's); a prefill\n"
        "instance's memory is mostly idle, so on a GPU its executor holds more than a decode instance",
    )
    p.add_argument("--out", default=None, help="results JSON; default bench-results/serve-<timestamp>.json")
    p.add_argument(
        "--plots-dir",
        type=Path,
        default=None,
        help="where the PNG plots go, named after the results JSON; default: beside it",
    )
    p.add_argument("--no-plots", action="store_true", help="write no plots (matplotlib is then not imported)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    for m in modes:
        try:
            parse_offload_ratio(m)
        except ValueError as exc:
            parser.error(str(exc))
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:  # say so now, not after the run
        parser.error("matplotlib is not installed (make install installs it); or pass --no-plots")
    args.out = args.out or f"bench-results/serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from common.model.tiny import make_tiny

        folder = Path(tempfile.mkdtemp(prefix="adrenaline-bench-")) / f"{args.preset}-llama"
        model = make_tiny(folder, "llama", preset=args.preset)
    else:
        model = Path(args.model)
    config = json.loads((model / "config.json").read_text())
    workload = make_workload(args.dist, args.num_requests, args.rate, config["vocab_size"], args.seed)
    avg_len = statistics.mean(len(r.prompt) + r.max_tokens for r in workload)
    kv = args.decode_kv_bytes or int(args.decode_kv_requests * avg_len * kv_bytes_per_token(config))
    executor_kv = (
        None
        if args.executor_kv_requests is None
        else int(args.executor_kv_requests * avg_len * kv_bytes_per_token(config))
    )
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for ratio in modes:
            runs[ratio].append(run_mode(args, model, ratio, workload, kv, rep, executor_kv))
    results: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "num_prompts": args.num_requests,  # vLLM's names for the workload's size and arrival rate
        "request_rate": args.rate if math.isfinite(args.rate) else "inf",
        "args": {k: v for k, v in vars(args).items()},
        "model": str(model),
        "decode_kv_bytes": kv,
        "executor_kv_bytes": executor_kv if executor_kv is not None else kv,
        "modes": {
            str(m): {"summary": median_summary(r, "summary"), "decode": median_summary(r, "decode"), "runs": r}
            for m, r in runs.items()
        },
    }
    lines = render_modes(results["modes"])
    ratios = throughput_ratios(results["modes"])
    lines += [f"{m} vs {modes[0]}: {r:.2f}x output throughput" for m, r in ratios.items()]
    results["throughput_ratios"] = ratios
    results["ratio_curve"] = ratio_curve(results["modes"])
    if results["ratio_curve"]:
        lines += ["", "Output throughput against the offload ratio:", *render_ratio_curve(results["ratio_curve"])]
    results["report"] = "\n".join(lines)
    print(results["report"])
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {out}")
    if not args.no_plots:
        from benchmarks.plots import write_plots  # matplotlib's import costs ~0.5 s: only when plotting

        for path in write_plots(results, plot_paths(out, args.plots_dir)):
            print(f"plot: {path}")
    return results

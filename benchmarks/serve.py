"""Serving benchmark: plain PD vs Adrenaline offloading, side by side in one run.

For each mode (an offload ratio; 0 is plain PD disaggregation) it starts a LocalCluster, sends
one seeded workload through the OpenAI completions API (streaming), and measures per request
the time to first token (TTFT), inter-token latencies (ITL), time per output token
(TPOT = (e2e - ttft) / (output_tokens - 1)) and end-to-end latency; per mode the output and
request throughput, latency percentiles and goodput under a TPOT SLO. After each mode it
scrapes the decode instances' Prometheus metrics (mean decode batch size, offloaded share,
per-layer offload round trip, step time).

Everything runs on one CPU machine, so absolute numbers mean little: what matters is the
ratio between modes measured with the same workload, machine and pinning. The decode KV
budget defaults to room for ~16 average requests so that the decode batch is memory-bound,
which is the regime Adrenaline targets (offloaded requests keep their KV on the executors,
so the decode instance can batch more).

Workloads (approximations, not the datasets):
- "sharegpt": lognormal lengths; prompt median 160 (sigma 0.9, capped 1024), output median
  120 (sigma 0.8, capped 512), roughly the shape of ShareGPT conversations.
- "long-output": prompts ~64 (normal, sd 16), outputs uniform in [400, 800].
- "tiny": prompts 8-32, outputs 4-16 (smoke tests).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openai
from tqdm import tqdm

from common.config import parse_offload_ratio


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


async def run_workload(url: str, model: str, workload: list[Request], label: str) -> tuple[list[Record], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    with tqdm(total=len(workload), desc=label, unit="req", disable=not sys.stderr.isatty()) as bar:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(send(client, model, r, t0, bar) for r in workload))
        wall = time.perf_counter() - t0
    await client.close()
    return list(records), wall


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


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def summarize(records: list[Record], wall: float, tpot_slo_s: float) -> dict[str, float]:
    ok = [r for r in records if r.error is None]
    out: dict[str, float] = {
        "output_tok_s": sum(r.output_tokens for r in ok) / wall,
        "req_s": len(ok) / wall,
        "goodput_req_s": sum(1 for r in ok if not r.tpot_s > tpot_slo_s) / wall,
        "errors": float(len(records) - len(ok)),
        "wall_s": wall,
    }
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [r.tpot_s for r in ok if not math.isnan(r.tpot_s)],
        "itl": [x for r in ok for x in r.itl_s],
        "e2e": [r.e2e_s for r in ok],
    }
    for name, values in series.items():
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = 1e3 * pct(values, q)
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
    args: argparse.Namespace, model: Path, ratio: str, workload: list[Request], kv: int, rep: int
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
    )
    cluster.start()
    try:
        cluster.wait_ready()
        records, wall = asyncio.run(run_workload(cluster.url, model.name, workload, f"ratio {ratio} #{rep}"))
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
        "records": [asdict(r) for r in records],
    }


def median_summary(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {k: statistics.median(run[key][k] for run in runs) for k in runs[0][key]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adrenaline bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF folder; default: the default tiny llama in a temp dir")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--dist", choices=("sharegpt", "long-output", "tiny"), default="sharegpt")
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="0,auto", help="comma-separated offload ratios ('auto' or in [0, 1])")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tpot-slo-ms", type=float, default=200.0, help="goodput's SLO, and the auto policy's")
    p.add_argument("--decode-kv-bytes", type=int, default=None, help="default: room for ~16 average requests")
    p.add_argument("--out", default=None, help="results JSON; default bench-results/serve-<timestamp>.json")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.out = args.out or f"bench-results/serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from common.model.tiny import make_tiny

        model = make_tiny(Path(tempfile.mkdtemp(prefix="adrenaline-bench-")) / "tiny-llama", "llama", preset="default")
    else:
        model = Path(args.model)
    config = json.loads((model / "config.json").read_text())
    workload = make_workload(args.dist, args.num_requests, args.rate, config["vocab_size"], args.seed)
    avg_len = statistics.mean(len(r.prompt) + r.max_tokens for r in workload)
    kv = args.decode_kv_bytes or int(16 * avg_len * kv_bytes_per_token(config))
    modes = args.modes.split(",")
    for m in modes:
        parse_offload_ratio(m)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for ratio in modes:
            runs[ratio].append(run_mode(args, model, ratio, workload, kv, rep))
    results: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items()},
        "model": str(model),
        "decode_kv_bytes": kv,
        "modes": {
            str(m): {"summary": median_summary(r, "summary"), "decode": median_summary(r, "decode"), "runs": r}
            for m, r in runs.items()
        },
    }
    cols = [
        "output_tok_s",
        "req_s",
        "goodput_req_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "itl_p50_ms",
        "e2e_p50_ms",
        "errors",
        "kv_blocks_left",
    ]
    dcols = [
        "mean_batch_size",
        "offloaded_share",
        "round_trip_ms",
        "local_attention_ms",
        "stall_ms",
        "step_ms",
        "executor_gb_s",
    ]
    lines = ["| ratio | " + " | ".join(cols + dcols) + " |", "|---" * (len(cols) + len(dcols) + 1) + "|"]
    for m, res in results["modes"].items():
        vals = [res["summary"][c] for c in cols] + [res["decode"][c] for c in dcols]
        lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    base = modes[0]
    base_tput = results["modes"][str(base)]["summary"]["output_tok_s"]
    ratios = {str(m): results["modes"][str(m)]["summary"]["output_tok_s"] / base_tput for m in modes[1:]}
    lines += [f"{m} vs {base}: {r:.2f}x output throughput" for m, r in ratios.items()]
    results["throughput_ratios"] = ratios
    results["report"] = "\n".join(lines)
    print(results["report"])
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {args.out}")
    return results

"""Serving benchmark: plain PD vs Adrenaline offloading, side by side in one run.

For each mode (an offload ratio; 0 is plain PD disaggregation) it starts a LocalCluster, sends
one seeded workload (benchmarks/workload.py) through the OpenAI completions API (streaming), and
reports per mode the output and request throughput, latency statistics and goodput under a TPOT
SLO, under the names `vllm bench serve` gives them (benchmarks/results.py). While the workload
runs it listens to the cluster's own heartbeats (decode batch size, offloaded requests over
time), and after each mode it scrapes the decode instances' Prometheus metrics (mean decode
batch size, offloaded share, per-layer offload round trip, step time; benchmarks/observe.py).
The results go to one JSON file, and plots of them (benchmarks/plots.py) to PNG files beside it.

Everything runs on one CPU machine, so absolute numbers mean little: what matters is the
ratio between modes measured with the same workload, machine and pinning. The decode KV
budget defaults to room for ~16 average requests (`--decode-kv-requests`) so that the decode
batch is bounded by memory capacity, which is the regime Adrenaline targets (offloaded requests
keep their KV on the executors, so the decode instance can batch more). Offloading pays where a
bigger batch costs little more per step: where the step reads weights rather than computes.
The embedded default model computes (its GEMMs at batch 9 already take longer than reading its
15 MB of weights); `--preset memory-bound` makes a model in the paper's regime.

Workloads: "sharegpt" (lognormal lengths, roughly ShareGPT's shape), "long-output" (prompts
~64, outputs 400-800) and "tiny" (smoke tests); benchmarks/workload.py says how they are drawn.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.observe import decode_summary, kv_left, measure, observer, scrape
from benchmarks.results import (
    median_summary,
    plot_paths,
    ratio_curve,
    render_modes,
    render_ratio_curve,
    summarize,
    throughput_ratios,
)
from benchmarks.workload import Request, kv_bytes_per_token, make_workload
from common.config import parse_offload_ratio


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

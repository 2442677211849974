"""One run's figures under `vllm bench serve`'s names, their medians over repeats, and the tables.

Where `vllm bench serve` reports the same quantity the key is its name (`output_throughput`,
`median_ttft_ms`, `p99_tpot_ms`, ...), so that results of both read alike.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workload import Record
from common.config import parse_offload_ratio

# Per-request latency series and the statistics reported for each, named as `vllm bench serve`
# names them: f"{stat}_{series}_ms", e.g. "median_ttft_ms", "p99_tpot_ms".
LATENCY_SERIES = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)


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
    "executor_step_ms",
    "executor_gb_s",
    "recomputed",
    "resumed",
)


def render_modes(modes: dict[str, dict[str, Any]]) -> list[str]:
    """The per-mode table (Markdown), medians over repeats."""
    cols = [*SUMMARY_COLUMNS, *DECODE_COLUMNS]
    lines = ["| mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for mode, res in modes.items():
        vals = [res["summary"][c] for c in SUMMARY_COLUMNS] + [res["decode"].get(c, math.nan) for c in DECODE_COLUMNS]
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

"""PNG plots of `adrenaline bench` results (benchmarks/serve.py's JSON).

Four figures, each one PNG named after the results file (`serve-<time>-<name>.png`):
- throughput: output tokens/s per mode (median of the repeats as a bar, each repeat as a dot);
- latency: the TTFT and TPOT distributions per mode as CDFs (every request of every repeat);
- timeline: decode batch size, requests in flight and offloaded share over the first repeat of
  each mode, from the cluster's heartbeats and the scheduler (see `serve.ClusterSampler`);
- ratio-curve: output throughput against the offload ratio, the fixed ratios as a line and
  `auto` as a marked point at the share it chose (only when two or more fixed ratios ran).

The figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot:
no display, no global figure state to leak between calls, nothing to close. serve.py imports
this module only when it writes plots, so `--no-plots` never pays for importing matplotlib.

Re-plot a saved result: python -m benchmarks.plots bench-results/serve-<time>.json [--plots-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.observe import decode_timeline
from benchmarks.results import plot_paths
from common.config import parse_offload_ratio

DPI = 110


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def mode_label(mode: str) -> str:
    if mode == "auto":
        return "auto"
    ratio = parse_offload_ratio(mode)
    return "0 (plain PD)" if ratio == 0 else f"ratio {ratio:g}"


def mode_colors(modes: Sequence[str]) -> dict[str, str]:
    """One colour per mode, the same in every figure of a run."""
    return {mode: f"C{i % 10}" for i, mode in enumerate(modes)}


def ok_records(mode: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for run in mode["runs"] for r in run["records"] if r.get("error") is None]


def plot_throughput(results: dict[str, Any]) -> Figure:
    modes: dict[str, dict[str, Any]] = results["modes"]
    colors = mode_colors(list(modes))
    fig, (ax,) = new_figure(1.6 + 1.1 * len(modes), 4.0)
    names = list(modes)
    medians = [modes[m]["summary"]["output_throughput"] for m in names]
    ax.bar(range(len(names)), medians, color=[colors[m] for m in names], alpha=0.8)
    base = medians[0]
    for i, mode in enumerate(names):
        per_run = [run["summary"]["output_throughput"] for run in modes[mode]["runs"]]
        if len(per_run) > 1:
            ax.plot([i] * len(per_run), per_run, "o", color="black", markersize=3, label="_repeat")
        note = f"{medians[i]:.0f}" + (f"\n{medians[i] / base:.2f}x" if i and base else "")
        ax.annotate(note, (i, medians[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [mode_label(m) for m in names])
    ax.set_ylabel("output tokens/s")
    repeats = len(next(iter(modes.values()))["runs"])
    ax.set_title(f"Output throughput per mode (median of {repeats})", fontsize=10)
    ax.margins(y=0.15)
    return fig


def cdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the share of values at or below each: an empirical CDF."""
    x = np.sort(np.asarray([v for v in values if math.isfinite(v)], dtype=float))
    return x, np.arange(1, x.size + 1) / max(x.size, 1)


def plot_latency(results: dict[str, Any]) -> Figure:
    """TTFT and TPOT as CDFs: the tails (429 waits, preemptions) are what differs between modes,
    and a CDF shows them where a mean or a box hides them."""
    modes: dict[str, dict[str, Any]] = results["modes"]
    colors = mode_colors(list(modes))
    fig, (ttft_ax, tpot_ax) = new_figure(10.0, 4.0, cols=2)
    lowest_ttft = math.inf
    for mode, res in modes.items():
        records = ok_records(res)
        for ax, key in ((ttft_ax, "ttft_s"), (tpot_ax, "tpot_s")):
            x, y = cdf([1e3 * r[key] for r in records])
            if x.size:
                ax.plot(x, y, drawstyle="steps-post", color=colors[mode], label=mode_label(mode))
                if key == "ttft_s":
                    lowest_ttft = min(lowest_ttft, float(x[0]))
    ttft_ax.set_xlabel("TTFT ms (log)")
    tpot_ax.set_xlabel("TPOT ms")
    for ax, title in ((ttft_ax, "Time to first token"), (tpot_ax, "Time per output token")):
        if ax.lines:
            ax.legend(fontsize=8)
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if 0 < lowest_ttft < math.inf:  # TTFTs span milliseconds to the 429-queued tail's seconds
        ttft_ax.set_xscale("log")
    return fig


def plot_timeline(results: dict[str, Any]) -> Figure:
    """Over the first repeat of each mode: decode batch (solid) and requests in flight at the
    scheduler (dotted) on top, offloaded share below."""
    modes: dict[str, dict[str, Any]] = results["modes"]
    colors = mode_colors(list(modes))
    fig, (batch_ax, share_ax) = new_figure(10.0, 6.0, rows=2)
    share_ax.sharex(batch_ax)
    for mode, res in modes.items():
        timeline = res["runs"][0].get("timeline") or {}
        series = decode_timeline(timeline)
        label = mode_label(mode)
        if series["t"]:
            # a heartbeat's value holds until the next one: steps, not slopes
            batch_ax.plot(
                series["t"], series["batch"], drawstyle="steps-post", color=colors[mode], label=f"{label}: decode batch"
            )
            share_ax.plot(
                series["t"], series["offloaded_share"], drawstyle="steps-post", color=colors[mode], label=label
            )
        inflight = timeline.get("inflight", [])
        if inflight:
            batch_ax.plot(
                [s["t"] for s in inflight],
                [s["inflight"] for s in inflight],
                ":",
                drawstyle="steps-post",
                color=colors[mode],
                label=f"{label}: in flight",
            )
    batch_ax.set_ylabel("requests")
    batch_ax.set_ylim(bottom=0)
    batch_ax.set_title("Decode batch (heartbeats) and requests in flight (scheduler), first repeat", fontsize=10)
    share_ax.set_ylabel("offloaded share of the batch")
    share_ax.set_ylim(-0.02, 1.02)
    share_ax.set_xlabel("seconds from the workload's start")
    for ax in (batch_ax, share_ax):
        if ax.lines:
            ax.legend(fontsize=8, ncols=2)
        ax.grid(alpha=0.3)
    return fig


def plot_ratio_curve(curve: list[dict[str, Any]]) -> Figure:
    """`serve.ratio_curve` rows: fixed ratios as a line, `auto` as a star at the offloaded share
    it measured (a dashed level line if it measured none), each point marked with its gain."""
    fig, (ax,) = new_figure(6.0, 4.0)
    fixed = [row for row in curve if row["offload_ratio"] is not None]
    auto = [row for row in curve if row["offload_ratio"] is None]
    ax.plot(
        [row["offload_ratio"] for row in fixed],
        [row["output_throughput"] for row in fixed],
        "o-",
        color="C0",
        label="fixed offload ratio",
    )
    for row in auto:
        if math.isfinite(row["offloaded_share"]):
            ax.plot(
                [row["offloaded_share"]],
                [row["output_throughput"]],
                "*",
                color="C3",
                markersize=14,
                label="auto (at the share it offloaded)",
            )
        else:
            ax.axhline(row["output_throughput"], linestyle="--", color="C3", label="auto")
    for row in curve:
        x = row["offload_ratio"] if row["offload_ratio"] is not None else row["offloaded_share"]
        if math.isfinite(x):
            ax.annotate(
                f"{row['relative']:.2f}x",
                (x, row["output_throughput"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
            )
    ax.set_xlabel("offload ratio (share of requests whose attention runs on executors)")
    ax.set_ylabel("output tokens/s")
    ax.set_xlim(-0.05, 1.05)
    ax.margins(y=0.15)
    ax.set_title("Output throughput against the offload ratio", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_plots(results: dict[str, Any], stem: Path) -> list[Path]:
    """Write every plot the results allow as `<stem>-<name>.png`; returns the paths written.
    Results saved before the timeline existed get no timeline plot rather than an empty one."""
    figures = {"throughput": plot_throughput(results), "latency": plot_latency(results)}
    if any(run.get("timeline", {}).get("loads") for mode in results["modes"].values() for run in mode["runs"]):
        figures["timeline"] = plot_timeline(results)
    if results.get("ratio_curve"):
        figures["ratio-curve"] = plot_ratio_curve(results["ratio_curve"])
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = stem.parent / f"{stem.name}-{name}.png"
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plots", description="plots of a saved bench result")
    p.add_argument("results", type=Path, help="a JSON file written by adrenaline bench")
    p.add_argument("--plots-dir", type=Path, default=None, help="default: beside the results")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    paths = write_plots(results, plot_paths(args.results, args.plots_dir))
    for path in paths:
        print(f"plot: {path}")
    return paths


if __name__ == "__main__":
    main()

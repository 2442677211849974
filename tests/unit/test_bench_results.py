"""`adrenaline bench`'s results without a cluster: vLLM's key names, the offload-ratio curve, the
timeline from heartbeats, the progress bar's terminal check and the PNG plots, all from
synthetic records."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import plots
from benchmarks.observe import decode_timeline
from benchmarks.results import (
    DECODE_COLUMNS,
    median_summary,
    ratio_curve,
    render_modes,
    render_ratio_curve,
    summarize,
    throughput_ratios,
)
from benchmarks.workload import Record, progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODES = ("0", "0.5", "1", "auto")
# Output tokens per second the synthetic runs are built to reach, per mode.
TARGET_THROUGHPUT = {"0": 100.0, "0.5": 130.0, "1": 90.0, "auto": 140.0}
SHARE = {"0": 0.0, "0.5": 0.5, "1": 1.0, "auto": 0.3}


def records(seed: int, n: int = 20) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rec = Record(prompt_tokens=int(rng.integers(8, 64)), max_tokens=10)
        rec.output_tokens = 10
        rec.ttft_s = float(rng.uniform(0.05, 2.0))
        rec.tpot_s = float(rng.uniform(0.02, 0.08))
        rec.e2e_s = rec.ttft_s + 9 * rec.tpot_s
        rec.itl_s = [rec.tpot_s] * 9
        out.append(rec)
    return out


def heartbeats(share: float) -> dict[str, list[dict[str, Any]]]:
    """Two seconds of heartbeats: a decode batch of 8 then 4, `share` of it on one executor."""
    loads = []
    for i in range(8):
        t = 0.25 * i
        batch = 8 if t < 1.0 else 4
        loads.append({"t": t, "instance": "executor-0", "role": "executor", "running": round(share * batch)})
        loads.append({"t": t + 0.01, "instance": "decode-0", "role": "decode", "running": batch})
    return {"loads": loads, "inflight": [{"t": 0.0, "inflight": 12}, {"t": 1.0, "inflight": 5}]}


def run(mode: str, seed: int) -> dict[str, Any]:
    recs = records(seed)
    total_output = sum(r.output_tokens for r in recs)
    wall = total_output / TARGET_THROUGHPUT[mode]
    return {
        "summary": {**summarize(recs, wall, 0.2), "kv_blocks_left": 0.0},
        "decode": {**dict.fromkeys(DECODE_COLUMNS, 1.0), "offloaded_share": SHARE[mode]},
        "timeline": heartbeats(SHARE[mode]),
        "records": [asdict(r) for r in recs],
    }


def synthetic_results(modes: tuple[str, ...] = MODES, repeats: int = 2) -> dict[str, Any]:
    results: dict[str, Any] = {"modes": {}}
    for i, mode in enumerate(modes):
        runs = [run(mode, 10 * i + rep) for rep in range(repeats)]
        results["modes"][mode] = {
            "summary": median_summary(runs, "summary"),
            "decode": median_summary(runs, "decode"),
            "runs": runs,
        }
    results["ratio_curve"] = ratio_curve(results["modes"])
    return results


# ---- key names ------------------------------------------------------------------------------
def test_summary_uses_vllm_bench_serve_names() -> None:
    recs = records(0, n=5)
    recs[4].error = "ReadTimeout: boom"
    recs[0].retries = 3
    summary = summarize(recs, 2.0, 0.2)
    vllm = {
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
    }
    for series in ("ttft", "tpot", "itl", "e2el"):
        vllm |= {f"{stat}_{series}_ms" for stat in ("mean", "median", "std", "p90", "p99")}
    assert set(summary) == vllm | {"rate_limited_retries"}  # ours where vLLM has no such figure
    ok = recs[:4]
    assert summary["completed"] == 4 and summary["failed"] == 1 and summary["duration"] == 2.0
    assert summary["total_input_tokens"] == sum(r.prompt_tokens for r in ok)
    assert summary["total_output_tokens"] == 40 and summary["output_throughput"] == 20.0
    assert summary["total_token_throughput"] == (summary["total_input_tokens"] + 40) / 2.0
    assert summary["request_throughput"] == 2.0 and summary["rate_limited_retries"] == 3
    assert summary["median_ttft_ms"] == pytest.approx(1e3 * float(np.median([r.ttft_s for r in ok])))
    assert summary["mean_e2el_ms"] == pytest.approx(1e3 * float(np.mean([r.e2e_s for r in ok])))


def test_no_successful_request_gives_nan_latencies_not_zero() -> None:
    rec = Record(prompt_tokens=4, max_tokens=4, error="boom")
    summary = summarize([rec], 1.0, 0.2)
    assert summary["completed"] == 0 and summary["output_throughput"] == 0
    assert math.isnan(summary["median_ttft_ms"]) and math.isnan(summary["p99_tpot_ms"])


# ---- the offload-ratio curve ----------------------------------------------------------------
def test_ratio_curve_orders_fixed_ratios_then_auto_against_plain_pd() -> None:
    results = synthetic_results(("auto", "1", "0", "0.5"), repeats=1)
    curve = results["ratio_curve"]
    assert [row["mode"] for row in curve] == ["0", "0.5", "1", "auto"]
    assert [row["offload_ratio"] for row in curve] == [0.0, 0.5, 1.0, None]
    relative = [row["relative"] for row in curve]
    assert relative == pytest.approx([1.0, 1.3, 0.9, 1.4])
    assert curve[3]["offloaded_share"] == 0.3
    lines = render_ratio_curve(curve)
    assert lines[0].startswith("| offload ratio | offloaded share | output_throughput | vs 0 |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == ["0", "0.5", "1", "auto"]
    assert [c[2] for c in cells] == ["100.0", "130.0", "90.0", "140.0"]
    assert [c[3] for c in cells] == ["1.00x", "1.30x", "0.90x", "1.40x"]


def test_no_curve_from_one_fixed_ratio() -> None:
    results = synthetic_results(("0", "auto"), repeats=1)
    assert results["ratio_curve"] == [] and render_ratio_curve([]) == []


def test_throughput_ratios_against_the_first_mode_even_when_it_produced_nothing() -> None:
    modes = synthetic_results(("0.5", "0", "auto"), repeats=1)["modes"]
    assert throughput_ratios(modes) == pytest.approx({"0": 100 / 130, "auto": 140 / 130})
    modes["0.5"]["summary"]["output_throughput"] = 0.0
    assert all(math.isnan(r) for r in throughput_ratios(modes).values())


def test_mode_table_has_a_row_per_mode() -> None:
    lines = render_modes(synthetic_results(repeats=1)["modes"])
    assert "| mode | output_throughput | request_throughput |" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(MODES)


# ---- the timeline ---------------------------------------------------------------------------
def test_decode_timeline_joins_decode_and_executor_heartbeats() -> None:
    loads = [
        {"t": 0.0, "instance": "decode-0", "role": "decode", "running": 4},  # no executor heard yet
        {"t": 0.1, "instance": "executor-0", "role": "executor", "running": 1},
        {"t": 0.2, "instance": "decode-0", "role": "decode", "running": 4},
        {"t": 0.3, "instance": "decode-1", "role": "decode", "running": 4},  # two decode instances add up
        {"t": 0.35, "instance": "executor-0", "role": "executor", "running": 3},
        {"t": 0.4, "instance": "decode-0", "role": "decode", "running": 0},
        {"t": 0.45, "instance": "decode-1", "role": "decode", "running": 0},  # empty batch: share undefined
        {"t": 0.5, "instance": "decode-0", "role": "decode", "running": 2},  # executor beat is stale: clamped
    ]
    series = decode_timeline({"loads": loads[::-1]})  # order of arrival does not matter
    assert series["t"] == [0.0, 0.2, 0.3, 0.4, 0.45, 0.5]
    assert series["batch"] == [4, 4, 8, 4, 0, 2]
    assert series["offloaded"] == [0, 1, 1, 3, 0, 2]
    share = series["offloaded_share"]
    assert share[:4] == [0.0, 0.25, 0.125, 0.75] and math.isnan(share[4]) and share[5] == 1.0


# ---- progress bars --------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress(3, "x") as bar:
        assert bar.disable
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress(3, "x") as bar:
        assert not bar.disable
        bar.update(1)
    assert "1/3" in terminal.getvalue()


# ---- plots ----------------------------------------------------------------------------------
def test_plots_are_pngs_with_a_series_per_mode(tmp_path: Path) -> None:
    results = synthetic_results()
    paths = plots.write_plots(results, tmp_path / "out" / "serve-x")
    names = [p.name for p in paths]
    assert names == [f"serve-x-{n}.png" for n in ("throughput", "latency", "timeline", "ratio-curve")]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000

    (ax,) = plots.plot_throughput(results).axes
    assert [round(bar.get_height(), 6) for bar in ax.patches] == [100.0, 130.0, 90.0, 140.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0 (plain PD)", "ratio 0.5", "ratio 1", "auto"]
    assert len(ax.lines) == len(MODES)  # the repeats, as dots, per mode

    ttft_ax, tpot_ax = plots.plot_latency(results).axes
    for ax, key in ((ttft_ax, "ttft_s"), (tpot_ax, "tpot_s")):
        assert [line.get_label() for line in ax.lines] == ["0 (plain PD)", "ratio 0.5", "ratio 1", "auto"]
        first = results["modes"]["0"]["runs"]
        expected = sorted(1e3 * r[key] for run in first for r in run["records"])
        assert list(ax.lines[0].get_xdata()) == pytest.approx(expected)
        assert ax.lines[0].get_ydata()[-1] == 1.0  # a CDF ends at every request
    assert ttft_ax.get_xscale() == "log"

    batch_ax, share_ax = plots.plot_timeline(results).axes
    assert len(batch_ax.lines) == 2 * len(MODES)  # decode batch and in flight per mode
    assert list(batch_ax.lines[0].get_ydata()) == [8, 8, 8, 8, 4, 4, 4, 4]
    shares = {line.get_label(): list(line.get_ydata()) for line in share_ax.lines}
    assert shares["ratio 0.5"] == [0.5] * 8 and shares["0 (plain PD)"] == [0.0] * 8

    (ax,) = plots.plot_ratio_curve(results["ratio_curve"]).axes
    fixed, auto = ax.lines
    assert list(fixed.get_xdata()) == [0.0, 0.5, 1.0]
    assert list(fixed.get_ydata()) == pytest.approx([100.0, 130.0, 90.0])
    assert list(auto.get_xdata()) == [0.3] and list(auto.get_ydata()) == pytest.approx([140.0])
    assert auto.get_marker() == "*"


def test_saved_results_replot_and_older_ones_lack_only_the_timeline(tmp_path: Path) -> None:
    results = synthetic_results(("0", "auto"), repeats=1)
    for mode in results["modes"].values():
        for r in mode["runs"]:
            del r["timeline"]
    saved = tmp_path / "serve-old.json"
    saved.write_text(json.dumps(results))
    paths = plots.main([str(saved), "--plots-dir", str(tmp_path / "p")])
    assert [p.name for p in paths] == ["serve-old-throughput.png", "serve-old-latency.png"]
    assert all(p.parent == tmp_path / "p" for p in paths)


def test_the_benchmark_does_not_import_matplotlib_until_it_plots() -> None:
    code = "import sys, benchmarks.serve; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

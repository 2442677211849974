"""The serving benchmark end to end with tiny settings: both modes, no errors, a ratio line, the
cluster's heartbeats heard during the run, and its plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.serve import main
from common.model.tiny import make_tiny


@pytest.mark.timeout(90)
def test_bench_compares_modes(tmp_path: Path) -> None:
    model = make_tiny(tmp_path / "m", "llama")
    out = tmp_path / "r.json"
    argv = ["--model", str(model), "--num-requests", "6", "--dist", "tiny", "--modes", "0,auto", "--out", str(out)]
    results = main(argv)
    saved = json.loads(out.read_text())
    assert set(saved["modes"]) == {"0", "auto"}
    for mode in saved["modes"].values():
        assert mode["summary"]["output_throughput"] > 0 and mode["summary"]["completed"] == 6
        assert all(run["summary"]["kv_blocks_left"] == 0 for run in mode["runs"])
        records = mode["runs"][0]["records"]
        assert len(records) == 6 and all(r["error"] is None for r in records)
        roles = {beat["role"] for beat in mode["runs"][0]["timeline"]["loads"]}
        assert "decode" in roles
    assert "auto vs 0:" in results["report"]
    plots = sorted(p.name for p in tmp_path.glob("r-*.png"))
    assert plots == ["r-latency.png", "r-throughput.png", "r-timeline.png"]

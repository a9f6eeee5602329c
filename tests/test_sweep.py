"""scripts/sweep.py end to end on a tiny grid (real torchrun runs of infer.py): every file,
figures consistent with the runs' own JSON, a failed run recorded while the sweep goes on,
resume; and the grid's one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moebalance.config import ConfigError
from moebalance.harness.sweep import load_grid

ROOT = Path(__file__).resolve().parents[1]
GRID = """
base: {gen_len: 2, warmup: 0, eval_seqs: 1, eval_len: 32, batch: 2, prompt_len: 16}
axes:
  nproc: [1, 2]
  router:
    - {label: topk, router: topk}
    - {label: drop g=1, router: token_drop, router_args: {capacity_factor: 1.0}}
"""
# fails every 2-process run (exit 3) and starts the others with torchrun
FAILING_LAUNCHER = (
    "bash -c 'test {nproc} = 1 || exit 3; exec " + sys.executable
    + " -m torch.distributed.run --standalone --nproc-per-node {nproc} \"$@\"' launcher"
)


def _sweep(grid: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), str(grid), "--out",
                           str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _rank_imbalance_p50(records: list[dict]) -> float:
    """Independent of telemetry_stats: max / mean tokens per rank per (step, layer), median."""
    per_sample: dict = {}
    for r in records:
        if r["phase"] == "prefill":
            per_sample.setdefault((r["step"], r["layer"]), []).append(sum(r["tokens_per_expert"]))
    values = sorted(max(v) / (sum(v) / len(v)) for v in per_sample.values())
    mid = (len(values) - 1) / 2
    return (values[math.floor(mid)] + values[math.ceil(mid)]) / 2


def test_sweep_runs_summarises_records_failures_and_resumes(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out = tmp_path / "sweep"

    # 1. the 2-process runs fail: recorded, the sweep goes on, exit 1
    done = _sweep(grid, out, "--launcher", FAILING_LAUNCHER, "--no-plots")
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is False and summary["runs_finished"] == 2
    assert sorted(f["label"] for f in summary["failures"]) == ["nproc=2 · drop g=1", "nproc=2 · topk"]
    assert all("exit 3" in f["reason"] for f in summary["failures"])
    assert "Failed: nproc=2" in (out / "summary.md").read_text()

    # 2. a rerun resumes: only the failed runs run again
    first = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    done = _sweep(grid, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 of 4 runs already finished" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")
            if p.name in first} == first  # untouched

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == [] and summary["runs_finished"] == 4
    rows = summary["rows"]
    assert [(r["nproc"], r["router"]) for r in rows] == [
        (1, "topk"), (1, "token_drop"), (2, "topk"), (2, "token_drop")]
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    for row, line in zip(rows, table):
        report = json.loads((out / "runs" / f"{row['id']}.json").read_text())
        run = report["runs"][0]
        assert report["environment"]["world_size"] == row["nproc"] == int(line["nproc"])
        assert row["rank_imbalance_p50"] == pytest.approx(_rank_imbalance_p50(run["records"]))
        assert float(line["rank_imbalance_p50"]) == pytest.approx(row["rank_imbalance_p50"])
        assert row["perplexity"] == run["quality"]["all"]["perplexity"]
        assert row["prefill_ms"] == run["end_to_end"]["prefill_ms"]
        assert sorted(row["per_layer"]) == ["0", "1", "2", "3"]  # JSON keys
        # the run file infer.py read reproduces the cell
        assert (out / "runs" / f"{row['id']}.yaml").is_file()
    by = {(r["nproc"], r["router"]): r for r in rows}
    for nproc in (1, 2):
        vanilla, drop = by[(nproc, "topk")], by[(nproc, "token_drop")]
        assert vanilla["perplexity_change"] == 0
        assert drop["perplexity_change"] == pytest.approx(drop["perplexity"] / vanilla["perplexity"] - 1)
        assert drop["dropped_fraction"] > 0 and vanilla["dropped_fraction"] == 0
        assert drop["max_mean_load_p50"] < vanilla["max_mean_load_p50"]
    pngs = sorted((out / "plots").glob("*.png"))
    assert [p.name.split("_b2x16_")[1] for p in pngs] == [
        "latency_vs_ep.png", "load_per_layer.png", "quality_vs_imbalance.png",
        "straggler_per_layer.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # 3. nothing left to run
    done = _sweep(grid, out, "--no-plots")
    assert done.returncode == 0 and "4 of 4 runs already finished" in done.stderr


@pytest.mark.parametrize("text, message", [
    ("axes: {}", "'axes' must be a non-empty mapping"),
    ("axes: {router: topk}", "axis 'router' must be a non-empty list"),
    ("axes: {router: [bogus]}", "unknown router 'bogus'"),
    ("axes: {nproc: [0]}", "nproc must be an integer >= 1"),
    ("axes: {nproc: [1], batch: [0]}", "--batch"),
    ("axes: {shape: [{bogus: 1}]}", "unknown or reserved field(s) ['bogus']"),
    ("axes: {shape: [{out: x.json}]}", "unknown or reserved field(s) ['out']"),
    ("axes: {router: [topk, topk]}", "appears twice"),
    ("base: 3\naxes: {router: [topk]}", "'base' must be a mapping"),
    ("grid: 1", "unknown key(s) ['grid']"),
])
def test_bad_grids_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_default_grid_is_valid_and_spans_ep_1_2_4():
    _, cells = load_grid(ROOT / "moebalance" / "configs" / "grids" / "sweep-cpu.yaml")
    assert sorted({c.nproc for c in cells}) == [1, 2, 4]
    assert len({c.id for c in cells}) == len(cells)

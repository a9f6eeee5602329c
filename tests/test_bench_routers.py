"""The router benchmark script end to end on a tiny configuration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_routers", ROOT / "scripts" / "bench_routers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_laser_args_reach_the_laser_router_and_its_reference(tmp_path):
    bench = _bench()
    out = tmp_path / "r.json"
    argv = ["--presets", "olmoe", "--tokens", "64", "--repeats", "1", "--out", str(out),
            "--skewed", "none", "--laser-args", "repair_rounds=5", "eps_high=0.8"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    laser = result["config"]["routers"]["laser"]
    assert laser["repair_rounds"] == 5 and laser["eps_high"] == 0.8
    assert result["config"]["reference_params"] == laser
    assert result["config"]["routers"]["laser_fast"]["eps_high"] == 0.9  # others keep defaults
    rows = {r["router"]: r for r in result["results"]}
    assert {"topk", "laser", "laser_reference"} <= set(rows)
    # LASER moves experts, never adds or drops them: k = 8 per token
    assert rows["laser"]["experts_per_token"] == 8.0
    assert (out.with_suffix(".md")).exists()
    # every LASER router's peak is at or above the exact optimum of the same rank's pools,
    # and the op counts are there (vanilla top-k: a handful of ops)
    for router in ("laser", "laser_fast", "laser_reference"):
        gaps = rows[router]["optimum"]
        for peaks, optima in zip(gaps["peaks"], gaps["optima"]):
            assert len(peaks) == len(optima) == 8 and all(p >= o for p, o in zip(peaks, optima))
        assert gaps["gap"] >= 0 and gaps["gap_tokens"] >= 0
    assert 0 < rows["topk"]["kernels_per_call"] <= rows["topk"]["ops_per_call"] < 20
    assert rows["laser"]["ops_per_call"] > rows["laser_fast"]["ops_per_call"]
    assert "gap to opt" in out.with_suffix(".md").read_text()


def test_threads_apply_while_timing_and_are_restored(tmp_path):
    import torch

    bench = _bench()
    before = torch.get_num_threads()
    out = tmp_path / "r.json"
    argv = ["--presets", "mixtral", "--tokens", "32", "--repeats", "1", "--threads", "1",
            "--skewed", "none", "--no-optimum", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["config"]["threads"] == 1 and result["environment"]["torch_threads"] == 1
    assert torch.get_num_threads() == before  # the caller's setting is back


@pytest.mark.parametrize("bad, match", [(["repair_rounds"], "expects key=value"),
                                        (["pool_size=0"], "pool_size must be an integer"),
                                        (["rounds=2"], "unknown LaserParams field"),
                                        (["repair_rounds=[1"], "repair_rounds must be an integer"),
                                        (["load_only=true"], "router 'laser' runs load_only=False")])
def test_bad_laser_args_get_a_clear_error(bad, match, capsys):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--laser-args", *bad])
    assert match in capsys.readouterr().err


def test_bad_threads_get_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        _bench().parse_args(["--threads", "0"])
    assert "--threads must be >= 1 and <= 1024, got 0" in capsys.readouterr().err


def _fake_counts(path: Path) -> Path:
    """A tiny expert_counts.json in the shared data's layout: 64 experts, three layers, one
    expert taking 5x the mean."""
    counts = [[500] + [100] * 62 + [5]] * 3
    data = {"layers": [0, 7, 15], "models": {"olmoe-1b-7b-0924": {
        "num_experts": 64, "topk": 8, "domains": {"github": counts}, "domains_top1": {"github": counts}}}}
    path.write_text(json.dumps(data))
    return path


def test_skewed_workloads_come_from_the_real_counts_or_are_skipped(tmp_path):
    bench = _bench()
    workloads, note = bench.skewed_workloads(["github"], tmp_path / "absent.json")
    assert workloads == [] and "not found" in note
    workloads, note = bench.skewed_workloads(["github"], _fake_counts(tmp_path / "counts.json"))
    assert note is None
    by_name = {w.name: w for w in workloads}
    assert set(by_name) == {"olmoe-github", "olmoe-top2-github c=3", "olmoe-top2-github c=4"}
    assert by_name["olmoe-github"].preset.topk == 8 and by_name["olmoe-github"].laser == ()
    top2 = by_name["olmoe-top2-github c=3"]
    assert top2.preset.topk == 2 and dict(top2.laser) == {"pool_size": 3}
    # the profile is the counts over their mean, per layer
    assert top2.preset.profile(7, "github")[0] == pytest.approx(500 / (500 + 6200 + 5) * 64)


def test_a_skewed_workload_runs_end_to_end(tmp_path, monkeypatch):
    """The top-2 workload's pools (c = 3) reach the LASER routers and the reference, and the
    gap table lists it."""
    bench = _bench()
    monkeypatch.setattr(bench, "DEFAULT_COUNTS_PATH", _fake_counts(tmp_path / "counts.json"))
    out = tmp_path / "r.json"
    argv = ["--presets", "mixtral", "--tokens", "48", "--repeats", "1", "--skewed", "github",
            "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["preset"], r["router"]): r for r in result["results"]}
    assert rows[("olmoe-top2-github c=3", "laser")]["laser_overrides"] == {"pool_size": 3}
    assert result["config"]["workload_laser_overrides"]["olmoe-top2-github c=4"] == {"pool_size": 4}
    for workload in ("olmoe-github", "olmoe-top2-github c=3", "olmoe-top2-github c=4"):
        laser = rows[(workload, "laser")]
        assert laser["experts_per_token"] == (8.0 if workload == "olmoe-github" else 2.0)
        assert laser["optimum"]["gap_tokens"] <= 1  # reaches the optimum (one token at most)
    assert "| olmoe-top2-github c=4 | 48 |" in out.with_suffix(".md").read_text()

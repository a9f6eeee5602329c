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
            "--laser-args", "repair_rounds=5", "eps_high=0.8"]
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


def test_threads_apply_while_timing_and_are_restored(tmp_path):
    import torch

    bench = _bench()
    before = torch.get_num_threads()
    out = tmp_path / "r.json"
    argv = ["--presets", "mixtral", "--tokens", "32", "--repeats", "1", "--threads", "1",
            "--out", str(out)]
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

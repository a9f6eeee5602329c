"""moebalance.harness.memory: the per-rank memory estimate covers the peaks the shipped runs
measured (results/infer_*.json) without overshooting them by more than 2x, grows with every
shape, and refuses a run that cannot fit before anything starts, naming the largest batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebalance.config import ConfigError
from moebalance.harness import RunConfig, resolve
from moebalance.harness.memory import check_memory, estimate_peak_bytes, largest_batch
from moebalance.model_config import load_model_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RUNS = ["infer_expanded_drop_ep2.json", "infer_laser_wide_ep2.json"]


@pytest.mark.parametrize("name", SHIPPED_RUNS)
def test_estimate_covers_the_measured_peak(name):
    report = json.loads((ROOT / "results" / name).read_text())
    from moebalance.model_config import ModelConfig

    cfg = ModelConfig(**report["config"]["model"])
    run = report["config"]["run"]
    estimate = estimate_peak_bytes(
        cfg, batch=run["batch"], seq=report["config"]["padded_prompt_len"],
        gen=run["gen_len"], ep=report["environment"]["ep_size"],
    ) / 2**20
    for measured in (r["peak_memory_mib"] for result in report["runs"] for r in result["per_rank"]):
        assert measured <= estimate <= 2 * measured, (measured, estimate)


def test_estimate_grows_with_every_shape():
    cfg = load_model_config("tiny")
    base = dict(batch=8, seq=64, gen=16, ep=2)
    ref = estimate_peak_bytes(cfg, **base)
    for key, bigger in (("batch", 16), ("seq", 128), ("gen", 64)):
        assert estimate_peak_bytes(cfg, **{**base, key: bigger}) > ref, key
    assert estimate_peak_bytes(cfg, **{**base, "ep": 4}) < ref  # fewer experts per rank
    wide = cfg.replace(moe_ffn_hidden_size=4 * cfg.expert_ffn_hidden_size)
    assert estimate_peak_bytes(wide, **base) > ref


def test_largest_batch_is_the_boundary():
    cfg = load_model_config("tiny")
    budget = 3 * 2**30
    b = largest_batch(cfg, seq=256, gen=2, ep=2, budget=budget)
    assert b > 1
    assert estimate_peak_bytes(cfg, batch=b, seq=256, gen=2, ep=2) <= budget
    assert estimate_peak_bytes(cfg, batch=b + 1, seq=256, gen=2, ep=2) > budget
    assert largest_batch(cfg, seq=256, gen=2, ep=2, budget=2**20) == 0


def test_a_run_that_cannot_fit_is_refused_with_the_batch_that_fits():
    run = resolve(RunConfig(model="tiny", batch=100_000_000), world_size=2)
    with pytest.raises(ConfigError) as err:
        check_memory(run, 8 * 2**30)
    message = str(err.value)
    fits = largest_batch(run.model, seq=64, gen=16, ep=2, budget=8 * 2**30)
    assert "\n" not in message and message.startswith("--batch 100000000 x --prompt-len 64")
    assert f"the largest --batch that fits is {fits}" in message and fits > 8
    assert check_memory(resolve(RunConfig(model="tiny"), world_size=2), 8 * 2**30) > 0
    assert check_memory(run, None) > 8 * 2**30  # budget unknown: estimated, not refused

"""The simulated expert cache (``moebalance.expert_cache``) against a plain LRU, and cache-aware
LASER in a real Megatron-Core model: hits gained, decisions within the pools."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebalance import GateConfig, LaserParams, RoutingContext, route
from moebalance.config import ConfigError
from moebalance.expert_cache import ExpertCache
from moebalance.policies.laser_routing import laser_plan
from moebalance.runner import RouterRunner


def lru_reference(steps: list[list[int]], capacity: int) -> tuple[int, int]:
    """(uses, misses) of a plain LRU over ``steps`` (each: the distinct experts of one step,
    lowest id kept first when a step overflows the cache)."""
    cache: list[int] = []  # most recent last
    uses = misses = 0
    for used in steps:
        used = sorted(set(used))
        uses += len(used)
        misses += sum(e not in cache for e in used)
        for e in reversed(used):  # the lowest id ends up most recent
            if e in cache:
                cache.remove(e)
            cache.append(e)
        cache = cache[-capacity:]
    return uses, misses


@given(
    st.integers(2, 10).flatmap(lambda E: st.tuples(
        st.just(E),
        st.integers(1, E),
        st.lists(st.lists(st.integers(0, E - 1), min_size=1, max_size=4), min_size=1, max_size=40),
    ))
)
@settings(max_examples=200, deadline=None)
def test_cache_counts_as_a_plain_lru(case):
    E, capacity, steps = case
    cache = ExpertCache(E, capacity)
    for used in steps:
        routing_map = torch.zeros(len(used), E, dtype=torch.bool)
        routing_map[torch.arange(len(used)), torch.tensor(used)] = True
        cache.record(routing_map)
    uses, misses = lru_reference(steps, capacity)
    assert (int(cache.uses), int(cache.misses)) == (uses, misses)
    assert cache.steps == len(steps)
    assert int(cache.resident().sum()) == min(capacity, len({e for s in steps for e in s}))


def test_hand_computed_trace():
    cache = ExpertCache(4, 2)
    for experts in ([0, 1], [1, 2], [0, 2], [3, 2]):
        m = torch.zeros(1, 4, dtype=torch.bool)
        m[0, experts] = True
        cache.record(m)
    # misses: 0,1 (cold) | 2 | 0 | 3  -> 5 of 8 uses
    assert (int(cache.uses), int(cache.misses)) == (8, 5)
    assert cache.hit_rate() == pytest.approx(37.5)
    assert cache.resident().tolist() == [False, False, True, True]
    cost = cache.miss_cost(3, 2)
    assert cost.tolist() == [6.0, 6.0, 0.0, 0.0]


def test_bad_cache_input():
    for bad in (0, 5, True, 1.5):
        with pytest.raises(ConfigError, match="capacity"):
            ExpertCache(4, bad)
    with pytest.raises(ConfigError, match="experts"):
        ExpertCache(4, 2).record(torch.zeros(1, 3, dtype=torch.bool))
    gate = GateConfig(num_experts=8, topk=2)
    with pytest.raises(ConfigError, match="reads expert loads"):
        RouterRunner("topk", None, gate).attach_cache(4, aware=True)
    with pytest.raises(ConfigError, match="load_scope"):
        RouterRunner("laser", None, gate, load_scope="global").attach_cache(4, aware=True)
    with pytest.raises(ConfigError, match="at least topk"):
        RouterRunner("laser", None, gate).attach_cache(1)


def _decode(runner: RouterRunner, logits: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in range(logits.shape[0]):
        out.append(runner.route_tokens(logits[t:t + 1], runner.context(0, 1, layer=0), None).routing_map)
    return out


def test_cache_aware_laser_takes_resident_candidates_first():
    """One token per step: a flexible token takes every resident candidate of its valid pool
    before any other (checked against the cache state before each step), never leaves its
    pool, and skewed tokens keep vanilla top-k; the hit rate beats the unaware router's."""
    E, k = 16, 2
    gate = GateConfig(num_experts=E, topk=k, pre_softmax=True)
    params = LaserParams(pool_size=5, eps_high=0.8, min_score_ratio=0.2)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, E, generator=gen) * 1.5
    aware, plain = RouterRunner("laser", params, gate), RouterRunner("laser", params, gate)
    aware.attach_cache(4, aware=True)
    plain.attach_cache(4)
    for t in range(logits.shape[0]):
        x = logits[t:t + 1]
        resident = aware.cache.resident()
        chosen = aware.route_tokens(x, aware.context(0, 1, layer=0), None).routing_map[0]
        plain.route_tokens(x, plain.context(0, 1, layer=0), None)
        plan = laser_plan(x, gate, params, RoutingContext())
        if not bool(plan.flexible[0]):
            assert torch.equal(chosen, route("topk", x, gate).routing_map[0])
            continue
        pool = plan.pool_idx[0][plan.valid[0]]
        assert bool(chosen[pool].sum() == k) and int(chosen.sum()) == k
        want = min(k, int(resident[pool].sum()))
        assert int((chosen & resident).sum()) == want, t
    assert aware.cache.hit_rate() > plain.cache.hit_rate() + 5


@pytest.mark.parametrize("framework_name", ["megatron", "deepspeed"])
def test_cache_aware_routing_in_a_real_model(framework_name):
    """The option through a real Megatron-Core or DeepSpeed model (trained tiny-moe, world size
    1): every router gets a cache, decode steps count hits, and cache-aware LASER with wide
    pools misses less often than vanilla top-k on the same tokens."""
    pytest.importorskip("megatron.core" if framework_name == "megatron" else "deepspeed")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_cache_aware as bench

    from moebalance.corpus import default_corpus, heldout_sequences
    from moebalance.expert_cache import attach_caches, cache_stats
    from moebalance.harness.framework import one_process
    from moebalance.model_config import load_model_config, trained_checkpoint

    with one_process(framework_name, timeout_s=120.0) as (framework, setup):
        checkpoint, config = trained_checkpoint("tiny-moe")
        cfg = load_model_config(config)
        model = framework.build_model(cfg, setup, router="topk", router_params=None, load_scope="local",
                                      dispatcher=framework.dispatchers[0], checkpoint=str(checkpoint))
        seqs = heldout_sequences(default_corpus(), "prose", 1, 24)
        rates = {}
        for name, params, aware in (("topk", None, False),
                                    ("laser", LaserParams(pool_size=4, eps_high=1.01), True)):
            framework.swap_router(model, name, params, "local")
            assert attach_caches(model, 2, aware=aware) == len(cfg.moe_layer_indices)
            nll, tokens = bench.teacher_forced(framework, model, seqs)
            stats = cache_stats(model)
            assert tokens == 24 and sorted(stats) == list(range(len(cfg.moe_layer_indices)))
            assert all(s["steps"] == 24 for s in stats.values())
            rates[name] = sum(100 - s["hit_rate"] for s in stats.values())
        assert rates["laser"] < rates["topk"], rates


def test_infer_reports_each_routers_cache(tmp_path):
    """``infer.py --cache-experts N --cache-aware --compare`` under torchrun: every router's run
    carries per-layer cache counts, one step per model call (prefill, decode steps, warm-up
    included), each router with a fresh cache."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           str(root / "scripts" / "infer.py"), "--router", "laser", "--compare", "--cache-experts", "4",
           "--cache-aware", "--batch", "1", "--prompt-len", "8", "--gen-len", "3", "--eval-seqs", "0",
           "--no-pin", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["run"]["cache_experts"] == 4 and report["config"]["run"]["cache_aware"]
    for run in report["runs"]:
        stats = run["per_rank"][0]["expert_cache"]
        assert sorted(stats) == ["0", "1", "2", "3"]
        for layer in stats.values():
            assert layer["steps"] == 2 * 3  # (prefill + 2 decode steps) x (warm-up + measured)
            assert 0 <= layer["misses"] <= layer["uses"] and layer["uses"] >= 2 * 3 * 2

"""Replicas in Megatron-Core and DeepSpeed: a GPTModel whose MoE layers hold P > E physical expert slots
(``build_model(placement=...)``: slot s a copy of logical expert phy2log[s]) computes what the
unreplicated model computes, at world 1 and 2 (EP = world, gloo), for routers whose decisions
do not depend on where experts live; the tokens each slot receives are those the replica
choice sent it."""

from __future__ import annotations

import pytest

from mp_utils import run_workers

pytestmark = pytest.mark.slow

ROUTERS = ("topk", "token_drop", "laser")


def _plans(cfg, ep: int):
    import torch

    from moebalance.placement import plan_placement

    plans = {}
    for layer in cfg.moe_layer_indices:  # a skewed load so that hot experts get replicas
        load = torch.tensor([40.0, 5, 3, 25, 2, 1, 9, 15])[: cfg.num_experts].roll(layer)
        plans[layer] = plan_placement(load, cfg.num_experts + 2 * ep, ep)
    return plans


def _worker(rank, world):
    import torch

    from megatron_patch.model import build_model, destroy_distributed, init_distributed
    from moebalance.model_config import load_model_config
    from moebalance.replicas import ReplicaParams

    init_distributed(world, 60.0)
    cfg = load_model_config("tiny").replace(skew="none", num_layers=2, hidden_size=64)
    plans = _plans(cfg, world)
    gen = torch.Generator().manual_seed(7 + rank)
    ids = torch.randint(0, cfg.vocab_size, (3, 16), generator=gen)
    S = ids.shape[1]
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(3, 1, S, S)
    pos = torch.arange(S).unsqueeze(0).expand(3, S)
    out = {"slots": next(iter(plans.values())).num_slots}
    with torch.inference_mode():
        for router in ROUTERS:
            plain = build_model(cfg, ep_size=world, router=router)
            want = plain(ids, pos, mask).float()
            for policy in ("round_robin", "least_loaded", "local_first"):
                replicated = build_model(
                    cfg, ep_size=world, router=router, placement=plans,
                    replicas=ReplicaParams(policy=policy),
                )
                got = replicated(ids, pos, mask).float()
                out[f"{router}/{policy}"] = float((got - want).abs().max())
            # the layers hold P slots of E experts: the router scores E, the experts count P
            moe = [m for m in replicated.modules() if type(m).__name__ == "MoELayer"]
            out["router_rows"] = int(moe[0].router.weight.shape[0])
            out["local_slots"] = len(moe[0].local_expert_indices)
    destroy_distributed()
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_replicated_model_matches_the_unreplicated_one(world):
    results = run_workers(_worker, world, timeout_s=300)
    for out in results:
        assert out["router_rows"] == 8
        assert out["local_slots"] * world == out["slots"] == 8 + 2 * world
        for key, diff in out.items():
            if "/" in key:
                assert diff < 1e-5, (key, diff)


def _deepspeed_worker(rank, world):
    import torch

    from deepspeed_patch.model import build_model, destroy_distributed, init_distributed, swap_gates
    from moebalance.model_config import load_model_config
    from moebalance.replicas import ReplicaParams

    init_distributed(world, 60.0)
    cfg = load_model_config("tiny").replace(skew="none", num_layers=2, hidden_size=64)
    plans = _plans(cfg, world)
    gen = torch.Generator().manual_seed(7 + rank)
    ids = torch.randint(0, cfg.vocab_size, (3, 16), generator=gen)
    out = {}
    with torch.inference_mode():
        plain = build_model(cfg, ep_size=world, router="topk")
        replicated = build_model(
            cfg, ep_size=world, router="topk", placement=plans,
            replicas=ReplicaParams(policy="least_loaded"),
        )
        for router in ROUTERS:
            swap_gates(plain, router)
            swap_gates(replicated, router)
            out[router] = float((replicated(ids) - plain(ids)).abs().max())
        gate = next(m for m in replicated.modules() if type(m).__name__ == "BalancedGate")
        out["gate_rows"] = gate.wg.out_features
        out["replica_policy"] = gate.runner.replicas.policy
    destroy_distributed()
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_replicated_model_matches_the_unreplicated_one(world):
    for out in run_workers(_deepspeed_worker, world, timeout_s=300):
        assert out["gate_rows"] == 8 and out["replica_policy"] == "least_loaded"
        for router in ROUTERS:
            assert out[router] < 1e-5, (router, out[router])


# ----------------------------------------------------------------------------- infer.py


@pytest.fixture(scope="module")
def replicated_runs(tmp_path_factory):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("replicas")
    plan = tmp / "plan.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    out = {}
    replicas = ["--placement", str(plan), "--replica-policy", "least_loaded"]
    rebalanced = ["--replicate", "auto", "--rebalance-every", "1", "--rebalance-window", "2"]
    for name, extra in (("plain", []), ("replicas", replicas),
                        ("int8", [*replicas, "--memory-budget", "same"]),
                        ("rebalanced", rebalanced)):
        if name == "replicas":  # calibrated on the plain run's routing (its JSON report)
            subprocess.run(
                [sys.executable, str(root / "scripts" / "plan_placement.py"), "--loads",
                 str(tmp / "plain.json"), "--ep", "2", "--redundant", "4", "--out", str(plan)],
                cwd=root, env=env, check=True, capture_output=True, timeout=120,
            )
        path = tmp / f"{name}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "2", str(root / "scripts" / "infer.py"), "--router", "topk",
                   "--batch", "4", "--prompt-len", "32", "--gen-len", "3", "--eval-seqs", "2",
                   "--out", str(path), *extra]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        out[name] = json.loads(path.read_text())
    return out


def test_infer_serves_a_placement_with_the_same_outputs(replicated_runs):
    plain, replicas = replicated_runs["plain"]["runs"][0], replicated_runs["replicas"]["runs"][0]
    assert replicas["quality"] == plain["quality"]  # same model output, token for token
    assert [r["tokens"] for r in replicas["per_rank"]] == [r["tokens"] for r in plain["per_rank"]]
    # 12 slots, 6 per rank: the records count tokens per slot
    assert {len(r["local_experts"]) for r in replicas["records"]} == {6}
    assert replicated_runs["replicas"]["config"]["run"]["replica_policy"] == "least_loaded"
    # the replicated hot experts spread: the busiest slot holds fewer tokens (LIS falls)
    assert replicas["summary"]["prefill"]["lis"]["mean"] < plain["summary"]["prefill"]["lis"]["mean"]


def test_infer_memory_budget_keeps_expert_bytes_within_the_unreplicated_model(replicated_runs):
    memory = replicated_runs["int8"]["memory"]
    budget = memory["budget_per_rank"]
    assert all(b > budget for b in memory["expert_bytes_per_rank_before"])  # 6 slots > 4 experts
    assert all(a <= budget for a in memory["expert_bytes_per_rank_after"])
    assert any(any(mask) for mask in memory["int8_slots"].values())
    full = replicated_runs["replicas"]["runs"][0]["quality"]["all"]["perplexity"]
    int8 = replicated_runs["int8"]["runs"][0]["quality"]["all"]["perplexity"]
    assert abs(int8 / full - 1) < 0.01  # int8 weight-only experts cost well under 1% here


def test_infer_replicate_auto_plans_on_its_own_calibration_pass(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from moebalance.placement import load_plan

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "auto.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(root / "scripts" / "infer.py"), "--framework", "deepspeed", "--router", "topk",
         "--replicate", "auto", "--redundant", "2", "--calibration-domain", "prose",
         "--prompt-domain", "code", "--batch", "2", "--prompt-len", "32", "--gen-len", "2",
         "--eval-seqs", "0", "--memory-budget", "same", "--out", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    plans, provenance = load_plan(out.with_suffix(".plan.json"), num_experts=8, num_ranks=2)
    assert sorted(plans) == [0, 1, 2, 3] and {p.num_slots for p in plans.values()} == {12}
    assert "prose" in provenance["data"] and "--replicate" in provenance["command"]
    # the served model holds the planned slots: 6 per rank in every record
    assert {len(r["local_experts"]) for r in report["runs"][0]["records"]} == {6}
    # the hottest calibrated expert of each layer got more than one replica
    for layer, plan in plans.items():
        loads = provenance["loads"][str(layer)]
        assert int(plan.logcnt[loads.index(max(loads))]) > 1
        # activation importance: zero exactly for the experts calibration never reached
        importance = provenance["importance"][str(layer)]
        assert [v == 0 for v in importance] == [load == 0 for load in loads]
    # the int8 choice used those importances, and the budget holds
    memory = report["memory"]
    assert memory["importance"] == "activations"
    assert all(a <= memory["budget_per_rank"] for a in memory["expert_bytes_per_rank_after"])


def test_online_rebalancing_moves_weights_without_changing_the_model(replicated_runs):
    plain, moving = replicated_runs["plain"]["runs"][0], replicated_runs["rebalanced"]["runs"][0]
    # the weights followed their experts: the same outputs as the unreplicated model
    assert moving["quality"] == plain["quality"]
    assert [r["tokens"] for r in moving["per_rank"]] == [r["tokens"] for r in plain["per_rank"]]
    events = [r["rebalancing"] for r in moving["per_rank"]]
    assert len(events[0]) == len(events[1]) == 2 * 3  # every step of warm-up and measured run
    assert sum(e["slots_moved"] for e in events[0]) > 0
    for a, b in zip(*events):  # lockstep: same step, same moves; what one sends the other gets
        assert a["step"] == b["step"] and a["slots_moved"] == b["slots_moved"]
        assert a["sent_bytes"] == b["received_bytes"] and b["sent_bytes"] == a["received_bytes"]

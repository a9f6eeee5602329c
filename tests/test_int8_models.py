"""Int8 expert slots in Megatron-Core and DeepSpeed (``build_model(int8_slots=...)``), at world 1
and 2 (EP = world, gloo): the int8 model computes exactly what the full-precision model computes
with those slots' weights replaced by their dequantized values (bit for bit), so its only error is
the quantization's; its logits stay within a stated tolerance of the full-precision model's; each
rank's expert bytes, counted from the real tensors, drop by the int8 saving per quantized local
slot (a quarter plus the scales with every slot int8, fp32 model); and a replicated model whose
int8 slots come from ``int8_plan_for_budget`` stores no more expert bytes per rank than the
unreplicated one.

Tolerance (measured on this test's model and inputs, the same in both frameworks): int8 per
output channel moves each weight by at most max|row| / 254; on Gaussian rows (max ~ 4.4 sigma)
that is ~1% of a weight's RMS on average (uniform rounding error, RMS step / sqrt(12)). The tiny
model (random init, std 0.02, 2 MoE layers, hidden 64) has max |logit| ~0.6; per token, the max
|logit error| has median 0.30-0.54% of that and at most 0.78% (half the slots, all slots, and the
budgeted replicated model, world 1 and 2). The test allows ``LOGIT_TOL`` = 2% of the largest logit
per token (2.5x the largest measured) and a median under ``MEDIAN_TOL`` = 1%. A token whose top-k
choice sits at a near tie can flip to another expert under the perturbation; its error is then the
two experts' difference, not the quantization's (one token of 48 with every slot int8: 31% of the
largest logit), so up to ``FLIPS`` tokens per rank may exceed the tolerance. A wrong
dequantization (a missing scale, a freed weight) moves every token's logits by tens of percent,
and the bit-for-bit check against the fake-quantized model pins the computation exactly.
"""

from __future__ import annotations

import pytest

from mp_utils import run_workers

pytestmark = pytest.mark.slow

LOGIT_TOL = 2e-2  # per token, of max |logit| (see the module docstring)
MEDIAN_TOL = 1e-2  # median over tokens, of max |logit|
FLIPS = 2  # tokens per rank (of 48) allowed over LOGIT_TOL: top-k near ties (module docstring)
HIDDEN, FFN = 64, 512  # the test model's expert shape: fc1 [FFN, HIDDEN], fc2 [HIDDEN, FFN] (GELU)
FULL_EXPERT = 4 * 2 * FFN * HIDDEN  # fp32 bytes
INT8_EXPERT = 2 * FFN * HIDDEN + 4 * (FFN + HIDDEN)  # int8 weights + one float32 scale per row
PARTIAL = (1, 2, 5, 6)  # int8 experts without a placement: two per rank at world 2


def _config():
    from moebalance.model_config import load_model_config

    return load_model_config("tiny").replace(skew="none", num_layers=2, hidden_size=HIDDEN)


def _plans(cfg, ep: int):
    import torch

    from moebalance.placement import plan_placement

    plans = {}
    for layer in cfg.moe_layer_indices:  # hot experts get replicas (as test_replica_models)
        load = torch.tensor([40.0, 5, 3, 25, 2, 1, 9, 15])[: cfg.num_experts].roll(layer)
        plans[layer] = plan_placement(load, cfg.num_experts + 2 * ep, ep)
    return plans


def _gathered(local: dict) -> dict:
    """Union of every rank's {key: value}."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _run(framework: str, rank: int, world: int) -> dict:
    import importlib

    import torch

    from moebalance.quantize import (
        dequantize_int8, expert_importance, int8_plan_for_budget, int8_weight_bytes, int8_weights,
        module_weight_bytes, quantize_int8,
    )

    adapter = importlib.import_module(f"{framework}_patch.model")
    adapter.init_distributed(world, 60.0)
    cfg = _config()
    E, layers = cfg.num_experts, cfg.moe_layer_indices
    gen = torch.Generator().manual_seed(7 + rank)
    ids = torch.randint(0, cfg.vocab_size, (3, 16), generator=gen)
    S = ids.shape[1]
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(3, 1, S, S)
    pos = torch.arange(S).unsqueeze(0).expand(3, S)

    def build(**kw):
        return adapter.build_model(cfg, ep_size=world, router="topk", **kw)

    def logits(model):
        return model(ids, pos, mask).float()

    def token_errors(got):  # max |logit error| of each token [B * S]
        return (got - want).abs().amax(dim=-1).reshape(-1).tolist()

    out = {}
    with torch.inference_mode():
        plain = build()
        want = logits(plain)
        out["logit_max"] = float(want.abs().max())
        out["plain_bytes"] = adapter.expert_bytes(plain)
        experts = adapter.expert_modules(plain)
        out["local_experts"] = sorted(experts[layers[0]])
        # per-expert bytes from the real tensors of the built model, and its importance
        full = _gathered({e: module_weight_bytes(m) for e, m in experts[layers[0]].items()})
        small = _gathered({e: int8_weight_bytes(m) for e, m in experts[layers[0]].items()})
        importance = _gathered({
            (layer, e): expert_importance([m.linear_fc1.weight])
            for layer in layers for e, m in experts[layer].items()
        })
        full_bytes = torch.tensor([full[e] for e in range(E)])
        int8_bytes = torch.tensor([small[e] for e in range(E)])
        out["full_expert"], out["int8_expert"] = full[0], small[0]

        # some slots int8, no placement (P = E)
        flags = torch.zeros(E, dtype=torch.bool)
        flags[list(PARTIAL)] = True
        partial = build(int8_slots={layer: flags for layer in layers})
        got = logits(partial)
        out["partial_err"] = token_errors(got)
        out["partial_bytes"] = adapter.expert_bytes(partial)
        out["partial_quantized"] = sorted(
            e for e, m in adapter.expert_modules(partial)[layers[0]].items() if int8_weights(m))
        # the full-precision model with those weights fake-quantized computes the same, bit for bit
        for layer in layers:
            for e, m in experts[layer].items():
                if flags[e]:
                    for lin in (m.linear_fc1, m.linear_fc2):
                        lin.weight.copy_(dequantize_int8(*quantize_int8(lin.weight),
                                                         lin.weight.dtype))
        out["partial_vs_fake"] = float((got - logits(plain)).abs().max())

        # every slot int8
        every = build(int8_slots={layer: torch.ones(E, dtype=torch.bool) for layer in layers})
        out["all_err"] = token_errors(logits(every))
        out["all_bytes"] = adapter.expert_bytes(every)

        # replicas within the unreplicated budget: int8 slots from int8_plan_for_budget
        plans = _plans(cfg, world)
        scores = {layer: torch.tensor([importance[(layer, e)] for e in range(E)])
                  for layer in layers}
        chosen = int8_plan_for_budget(plans, scores, full_bytes, int8_bytes)
        replicated = build(placement=plans, int8_slots=chosen)
        out["replicated_err"] = token_errors(logits(replicated))
        out["replicated_bytes"] = adapter.expert_bytes(replicated)
        out["replicated_int8_local"] = sum(
            bool(int8_weights(m)) for slots in adapter.expert_modules(replicated).values()
            for m in slots.values())
        out["replicated_local"] = sum(
            len(slots) for slots in adapter.expert_modules(replicated).values())
        P = plans[layers[0]].num_slots
        local = range(rank * P // world, (rank + 1) * P // world)
        out["planned_int8_local"] = sum(int(chosen[layer][s]) for layer in layers for s in local)
        out["chosen"] = {layer: chosen[layer].tolist() for layer in layers}
    adapter.destroy_distributed()
    return out


def _megatron_worker(rank, world):
    return _run("megatron", rank, world)


def _deepspeed_worker(rank, world):
    return _run("deepspeed", rank, world)


def _check(results, world: int) -> None:
    cfg_layers = 2
    for rank, out in enumerate(results):
        per_rank = 8 // world
        assert out["local_experts"] == list(range(rank * per_rank, (rank + 1) * per_rank))
        assert out["full_expert"] == FULL_EXPERT and out["int8_expert"] == INT8_EXPERT
        assert out["plain_bytes"] == cfg_layers * per_rank * FULL_EXPERT
        mine = [e for e in PARTIAL if e in out["local_experts"]]
        assert out["partial_quantized"] == mine
        assert out["partial_bytes"] == out["plain_bytes"] - cfg_layers * len(mine) * (
            FULL_EXPERT - INT8_EXPERT)
        assert out["all_bytes"] == cfg_layers * per_rank * INT8_EXPERT
        assert 0.25 < out["all_bytes"] / out["plain_bytes"] < 0.26  # a quarter, plus the scales
        # the only error is the quantization's: the int8 model is the fake-quantized model
        assert out["partial_vs_fake"] == 0.0
        scale = out["logit_max"]
        for key in ("partial_err", "all_err", "replicated_err"):
            errors = sorted(out[key])
            over = [e for e in errors if e > LOGIT_TOL * scale]
            assert len(over) <= FLIPS, (key, over, scale)
            assert 0 < errors[len(errors) // 2] < MEDIAN_TOL * scale, (key, errors, scale)
        # the budget holds by byte count; the int8 slots are those planned for this rank
        assert out["replicated_bytes"] <= out["plain_bytes"]
        assert out["replicated_int8_local"] == out["planned_int8_local"] > 0
        assert out["replicated_bytes"] == (
            (out["replicated_local"] - out["replicated_int8_local"]) * FULL_EXPERT
            + out["replicated_int8_local"] * INT8_EXPERT)
        assert out["chosen"] == results[0]["chosen"]  # every rank plans alike


@pytest.mark.parametrize("world", [1, 2])
def test_megatron_int8_slots(world):
    _check(run_workers(_megatron_worker, world, timeout_s=300), world)


@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_int8_slots(world):
    _check(run_workers(_deepspeed_worker, world, timeout_s=300), world)

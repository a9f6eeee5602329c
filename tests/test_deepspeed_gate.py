"""DeepSpeed adapter (deepspeed_patch): BalancedGate in real DeepSpeed MoE layers on gloo ranks.

One spawn per world configuration: world 1, 2 and 4 with EP = world, and EP 2 inside the world-4
spawn. Every rank holds a different number of tokens (batch 3, 1, 4, 2 of 6 tokens); the
"_empty" cases give the last rank none. Each case builds a DeepSpeed ``MoE`` (hidden 16, 8
experts, top-2, fp32, distinct MLP experts) with ``make_moe`` and checks:

- the layer's output (DeepSpeed 0.19.8's sparse path) equals a dense reference computed from the
  gate's own decision with every expert's weights all-gathered to every rank;
- the dense 4-tuple, run through DeepSpeed <= 0.19.3's einsum dispatch, gives the same output and
  the same decision;
- both tuples pass ``check_gate_output`` (C agreed over the EP group, unique slots, ...);
- the decision equals the moebalance policy called directly on the gate's logits;
- C is the MAX over the EP group of each rank's largest expert column.

Plus: vanilla BalancedGate vs DeepSpeed's TopKGate (k = 1, 2, 4, drop_tokens=False, no RTS,
no Gumbel sampling); BalancedGate vs megatron_patch routers on identical logits (world 1, 2);
the install helpers (world 1).
"""

from __future__ import annotations

import functools
import re

import pytest

from mp_utils import run_workers

pytestmark = pytest.mark.slow

HIDDEN, FFN, EXPERTS, TOPK, SEQ = 16, 16, 8, 2, 6
BATCHES = (3, 1, 4, 2)  # per global rank: 18, 6, 24, 12 tokens
ATOL = 1e-5
COLLECTIVE_TIMEOUT_S = 60
CONFIGS = {1: (1,), 2: (2,), 4: (4, 2)}  # world -> EP sizes run in that spawn
WORLD_EP = [(w, ep) for w, eps in CONFIGS.items() for ep in eps]

DROP = {"capacity_factor": 1.0}  # capacity = the mean load: drops (and expands) happen

# name -> (policy, params, load_scope, options)
CASES = {
    "topk": ("topk", None, "local", {}),
    "laser": ("laser", None, "local", {}),
    "laser_global": ("laser", None, "global", {}),
    "laser_fast_global": ("laser_fast", None, "global", {}),
    "token_drop": ("token_drop", DROP, "local", {}),
    "expanded_drop": ("expanded_drop", DROP, "local", {}),
    "expanded_drop_capped": (
        "expanded_drop",
        {"capacity_factor": 1.0, "max_experts_per_token": 3},
        "local",
        {},
    ),
    "token_drop_decode": ("token_drop", DROP, "local", {"decode": True}),
    "token_drop_used_token": ("token_drop", DROP, "local", {"used_token": True}),
    "laser_global_empty": ("laser", None, "global", {"empty_last_rank": True}),
    "token_drop_empty": ("token_drop", DROP, "local", {"empty_last_rank": True}),
}

# Megatron comparison: name -> (policy, params, load_scope, decode)
MEGATRON_CASES = {
    "topk": ("topk", None, "local", False),
    "laser": ("laser", None, "local", False),
    "laser_global": ("laser", None, "global", False),
    "token_drop": ("token_drop", DROP, "local", False),
    "token_drop_decode": ("token_drop", DROP, "local", True),
    "expanded_drop": ("expanded_drop", DROP, "local", False),
}
MEGATRON_WORLDS = (1, 2)


# ----------------------------------------------------------------------------- in the ranks


def _num_tokens(rank: int, world: int, empty_last_rank: bool = False) -> int:
    if empty_last_rank and rank == world - 1:
        return 0
    return BATCHES[rank] * SEQ


def _tokens(rank: int, world: int, empty_last_rank: bool = False):
    """[batch, SEQ, HIDDEN] tokens of this rank (different counts per rank)."""
    import torch

    gen = torch.Generator().manual_seed(1000 + rank)
    batch = _num_tokens(rank, world, empty_last_rank) // SEQ
    return torch.randn(batch, SEQ, HIDDEN, generator=gen)


def _used_token(num_tokens: int, rank: int):
    """[S] float, 1 = real token: every third token (shifted per rank) is unused."""
    import torch

    used = torch.ones(num_tokens)
    used[(torch.arange(num_tokens) + rank) % 3 == 0] = 0.0
    return used


def _expert():
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, HIDDEN)
    )


def _build_layer(ep: int, name: str, params, load_scope: str):
    """A DeepSpeed MoE with a BalancedGate, EP set up, weights set deterministically: the gate
    is the same on every rank (as in a real model); each expert is distinct (seeded by its global
    index) so a token sent to the wrong expert or rank would show."""
    import torch
    import torch.distributed as dist

    from deepspeed_patch import make_moe, setup_expert_parallel

    layer = make_moe(
        HIDDEN, _expert(), EXPERTS, ep_size=ep, k=TOPK, router=name, params=params,
        load_scope=load_scope,
    )
    assert setup_expert_parallel(layer) == 1
    layer.eval()
    moe = layer.deepspeed_moe
    ep_rank = dist.get_rank(moe.ep_group)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        # logits of std ~1: softmax neither flat nor one-hot, so LASER has flexible tokens
        moe.gate.wg.weight.copy_(0.3 * torch.randn(moe.gate.wg.weight.shape, generator=gen))
        for i, expert in enumerate(moe.experts.deepspeed_experts):
            gen = torch.Generator().manual_seed(100 + ep_rank * moe.num_local_experts + i)
            for p in expert.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return layer


def _gathered_experts(layer):
    """[E, ...] stacks of every expert parameter (fc1 W, fc1 b, fc2 W, fc2 b), all-gathered
    over the EP group in expert order."""
    import torch
    import torch.distributed as dist

    moe = layer.deepspeed_moe
    out = []
    for j in range(4):
        local = torch.stack(
            [list(e.parameters())[j].detach() for e in moe.experts.deepspeed_experts]
        ).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(moe.ep_group))]
        dist.all_gather(parts, local, group=moe.ep_group)
        out.append(torch.cat(parts))
    return out


def _dense_reference(layer, tokens, probs):
    """[S, H]: sum_e probs[s, e] * expert_e(x_s), every expert computed on every token."""
    import torch

    w1, b1, w2, b2 = _gathered_experts(layer)
    x = tokens.reshape(-1, HIDDEN)
    hidden = torch.nn.functional.gelu(torch.einsum("sh,efh->esf", x, w1) + b1[:, None, :])
    per_expert = torch.einsum("esf,ehf->esh", hidden, w2) + b2[:, None, :]  # [E, S, H]
    return torch.einsum("se,esh->sh", probs, per_expert)


def _dense_format_forward(layer, tokens, used):
    """The gate's dense 4-tuple run through DeepSpeed <= 0.19.3's MOELayer.forward (einsum
    dispatch and combine, same all-to-alls and experts). Returns (gate output, [S, H])."""
    import torch
    from deepspeed.moe.sharded_moe import _AllToAll

    moe = layer.deepspeed_moe
    x = tokens.reshape(-1, HIDDEN)
    out = moe.gate(x, used, False)
    _, combine, dispatch, _ = out
    dispatched = torch.einsum("sec,sm->ecm", dispatch.type_as(x), x)
    if moe.ep_size > 1:
        dispatched = _AllToAll.apply(moe.ep_group, dispatched)
    dispatched = dispatched.reshape(moe.ep_size, moe.num_local_experts, -1, HIDDEN)
    expert_out = moe.experts(dispatched).reshape(moe.ep_size * moe.num_local_experts, -1, HIDDEN)
    if moe.ep_size > 1:
        expert_out = _AllToAll.apply(moe.ep_group, expert_out)
    return out, torch.einsum("sec,ecm->sm", combine.type_as(x), expert_out)


def _expected_routing(layer, tokens, valid, name, params, load_scope, decode):
    """The moebalance policy called directly on the gate's logits (valid rows), with the
    EP-global loads for load_scope='global' computed here independently."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from moebalance import GateConfig, RoutingContext, route

    moe = layer.deepspeed_moe
    gate_cfg = GateConfig(num_experts=EXPERTS, topk=TOPK)
    x = tokens.reshape(-1, HIDDEN).float()
    logits = torch.nn.functional.linear(x, moe.gate.wg.weight.float())
    logits = logits[valid]
    ctx = RoutingContext(
        ep_rank=dist.get_rank(moe.ep_group),
        ep_size=dist.get_world_size(moe.ep_group),
        decode=decode,
    )
    if load_scope == "global" and ctx.ep_size > 1:
        local = route("topk", logits, gate_cfg, None, ctx).routing_map.sum(0).float()
        total = local.clone()
        dist.all_reduce(total, group=moe.ep_group)
        ctx = dataclasses.replace(ctx, expert_load=total - local)
    if logits.shape[0] == 0:
        return route("topk", logits, gate_cfg, None, ctx), logits
    return route(name, logits, gate_cfg, params, ctx), logits


def _layer_case(rank: int, world: int, ep: int, case: str) -> dict:
    import torch
    import torch.distributed as dist

    from deepspeed_patch import check_gate_output, gate_output_routing
    from moebalance import GateConfig, route

    name, params, load_scope, opts = CASES[case]
    empty = bool(opts.get("empty_last_rank"))
    layer = _build_layer(ep, name, params, load_scope)
    moe = layer.deepspeed_moe
    moe.gate.decode = bool(opts.get("decode"))
    tokens = _tokens(rank, world, empty)
    S = tokens.shape[0] * SEQ
    used = _used_token(S, rank) if opts.get("used_token") else None
    valid = used != 0 if used is not None else torch.ones(S, dtype=torch.bool)

    seen = {}
    handle = moe.gate.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    try:
        with torch.no_grad():
            out, _, exp_counts = layer(tokens, used)
    finally:
        handle.remove()
    sparse = seen["out"]
    out = out.reshape(-1, HIDDEN)
    with torch.no_grad():
        dense, dense_out = _dense_format_forward(layer, tokens, used)

    def invariants(output):
        try:
            check_gate_output(output, num_tokens=S, num_experts=EXPERTS, ep_group=moe.ep_group)
            return "ok"
        except Exception as err:  # reported to pytest; the collective inside already ran
            return f"{type(err).__name__}: {err}"

    sparse_ok, dense_ok = invariants(sparse), invariants(dense)
    decision = gate_output_routing(sparse, EXPERTS)
    dense_decision = gate_output_routing(dense, EXPERTS)
    with torch.no_grad():
        reference = _dense_reference(layer, tokens, decision.probs)
        expected, logits = _expected_routing(
            layer, tokens, valid, name, params, load_scope, bool(opts.get("decode"))
        )
    vanilla = route("topk", logits, GateConfig(num_experts=EXPERTS, topk=TOPK))
    per_token = decision.routing_map[valid].sum(1)
    need = int(decision.routing_map.sum(0).max()) if S else 0
    return {
        "num_tokens": S,
        "ep_ranks": dist.get_process_group_ranks(moe.ep_group),
        "max_abs_err": float((out - reference).abs().max()) if S else 0.0,
        "dense_max_abs_err": float((dense_out - reference).abs().max()) if S else 0.0,
        "output_scale": float(reference.abs().max()) if S else 0.0,
        "sparse_invariants": sparse_ok,
        "dense_invariants": dense_ok,
        "dense_equals_sparse": torch.equal(dense_decision.routing_map, decision.routing_map)
        and torch.equal(dense_decision.probs, decision.probs),
        "matches_policy": torch.equal(decision.routing_map[valid], expected.routing_map)
        and torch.equal(decision.probs[valid], expected.probs.float()),
        "unused_routed_nowhere": not decision.routing_map[~valid].any(),
        "num_unused": int((~valid).sum()),
        "exp_counts_are_loads": torch.equal(exp_counts, decision.routing_map.sum(0)),
        "capacity": int(sparse[1]),
        "dense_capacity": int(dense[1].shape[2]),
        "need": need,
        "rows": int(sparse[3].shape[0]),
        "max_per_token": int(per_token.max()) if per_token.numel() else 0,
        "rows_not_k": int((per_token != TOPK).sum()),
        "rows_more_than_k": int((per_token > TOPK).sum()),
        "differs_from_vanilla": not torch.equal(decision.routing_map[valid], vanilla.routing_map),
    }


def _stock_case(rank: int, world: int, ep_group, k: int) -> dict:
    """Vanilla BalancedGate vs DeepSpeed's TopKGate sharing wg, both tuples. k = 1 compares
    with the pre-softmax gate (top1gating weights by the full softmax, not renormalised)."""
    import torch

    from deepspeed.moe.sharded_moe import TopKGate

    from deepspeed_patch import BalancedGate, gate_output_routing
    from moebalance import GateConfig

    stock = TopKGate(
        HIDDEN, EXPERTS, k, 1.0, 1.0, min_capacity=0, noisy_gate_policy=None, drop_tokens=False,
        use_rts=False, ep_group=ep_group, top2_2nd_expert_sampling=False,
    ).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        stock.wg.weight.copy_(0.3 * torch.randn(stock.wg.weight.shape, generator=gen))
    gate_cfg = GateConfig(num_experts=EXPERTS, topk=k, pre_softmax=(k == 1))
    ours = BalancedGate.from_gate(stock, "topk", gate_config=gate_cfg)
    x = _tokens(rank, world).reshape(-1, HIDDEN)
    result = {
        "shares_wg": ours.wg is stock.wg and ours.ep_group is ep_group,
        "num_tokens": x.shape[0],
    }

    def same_routing(a, b):
        ra, rb = gate_output_routing(a, EXPERTS), gate_output_routing(b, EXPERTS)
        return torch.equal(ra.routing_map, rb.routing_map) and torch.allclose(
            ra.probs, rb.probs, atol=1e-6, rtol=0
        )

    with torch.no_grad():
        a, b = stock(x, None, True), ours(x, None, True)
        result["sparse_capacity"] = (int(a[1]), int(b[1]))
        result["sparse_same_routing"] = same_routing(a, b)
        result["sparse_same_counts"] = torch.equal(a[6], b[6]) and a[2] == b[2]
        # identical tuples (row order, locations) where DeepSpeed's layout is choice-major
        result["sparse_identical_tuple"] = (
            torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
            and torch.allclose(a[5], b[5], atol=1e-6, rtol=0)
        )
        a, b = stock(x, None, False), ours(x, None, False)
        result["dense_shapes"] = (tuple(a[1].shape), tuple(b[1].shape))
        result["dense_same_routing"] = same_routing(a, b)
        result["dense_identical"] = (
            a[1].shape == b[1].shape and torch.equal(a[2], b[2])
            and torch.allclose(a[1], b[1], atol=1e-6, rtol=0)
        )
    return result


def _megatron_config(world: int, name: str, router_cls):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patch import prepare_config

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN, num_moe_experts=EXPERTS, moe_router_topk=TOPK,
        moe_token_dispatcher_type="alltoall", expert_model_parallel_size=world,
        moe_grouped_gemm=False, moe_permute_fusion=False, use_cpu_initialization=True,
        add_bias_linear=False, params_dtype=torch.float32,
    )
    return prepare_config(config, router_cls)


def _megatron_cases(rank: int, world: int) -> dict:
    """Same logits into megatron_patch's router and BalancedGate: identical decisions, also
    after the round trip through DeepSpeed's 7-tuple."""
    import torch
    from deepspeed.utils import groups
    from megatron.core import parallel_state

    from deepspeed_patch import BalancedGate, gate_output, gate_output_routing
    from megatron_patch import apply_cpu_shims, make_router_class

    apply_cpu_shims()  # no-op with CUDA; Megatron's router otherwise wants a CUDA device
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    ds_group = groups._get_expert_parallel_group(f"ep_size_{world}")
    gen = torch.Generator().manual_seed(50 + rank)
    logits = torch.randn(_num_tokens(rank, world), EXPERTS, generator=gen)
    out = {}
    try:
        for case, (name, params, scope, decode) in MEGATRON_CASES.items():
            router_cls = make_router_class(name, params, load_scope=scope)
            router = router_cls(config=_megatron_config(world, name, router_cls)).eval()
            router.decode = decode
            gate = BalancedGate(
                HIDDEN, EXPERTS, TOPK, name, params, load_scope=scope, ep_group=ds_group
            )
            gate.decode = decode
            with torch.no_grad():
                m_probs, m_map = router.routing(logits.clone())
                ours = gate.route_tokens(logits.clone())
                back = gate_output_routing(
                    gate_output(ours, TOPK, ep_group=ds_group), EXPERTS
                )
            out[case] = {
                "same_routing": torch.equal(m_map, ours.routing_map)
                and torch.equal(m_probs, ours.probs),
                "same_after_tuple": torch.equal(m_map, back.routing_map)
                and torch.equal(m_probs.float(), back.probs),
            }
    finally:
        parallel_state.destroy_model_parallel()
    return out


def _install_cases() -> dict:
    """install_gate / make_moe / helpers at world 1 (no EP collectives)."""
    import torch
    from deepspeed.moe.layer import MoE

    from deepspeed_patch import (
        BalancedGate,
        disable_gate_randomness,
        install_gate,
        set_decode,
        setup_expert_parallel,
    )

    def stock_moe(ep_size=1):
        torch.manual_seed(11)
        return MoE(HIDDEN, _expert(), EXPERTS, ep_size=ep_size, k=TOPK, min_capacity=0,
                   drop_tokens=False).eval()

    x = _tokens(0, 1)
    out = {}
    stock = stock_moe()
    gate = stock.deepspeed_moe.gate
    out["randomness_defaults_on"] = gate.use_rts and gate.top2_2nd_expert_sampling
    out["disabled"] = disable_gate_randomness(stock)
    gate = stock.deepspeed_moe.gate
    out["randomness_off"] = not gate.use_rts and not gate.top2_2nd_expert_sampling
    setup_expert_parallel(stock)
    with torch.no_grad():
        want = stock(x)[0]

    ours = stock_moe()
    keys = list(ours.state_dict())
    rng = torch.get_rng_state()
    installed = install_gate(ours, "topk")  # before setup_expert_parallel
    out["rng_kept"] = torch.equal(rng, torch.get_rng_state())
    out["same_keys"] = list(ours.state_dict()) == keys and "deepspeed_moe.gate.wg.weight" in keys
    out["setup_count"] = (setup_expert_parallel(ours), setup_expert_parallel(ours))
    ours.load_state_dict(stock.state_dict(), strict=True)
    with torch.no_grad():
        got = ours(x)[0]
    out["before_setup_identical"] = torch.allclose(want, got, atol=1e-6, rtol=0)
    out["gate_type"] = type(ours.deepspeed_moe.gate).__name__
    out["ep_group_set"] = installed.ep_group is not None

    late = stock_moe()
    setup_expert_parallel(late)
    install_gate(late, "topk")  # after: the EP group is carried over
    late.load_state_dict(stock.state_dict(), strict=True)
    with torch.no_grad():
        out["after_setup_identical"] = torch.allclose(want, late(x)[0], atol=1e-6, rtol=0)
    out["after_setup_ep_group"] = late.deepspeed_moe.gate.ep_group is not None

    model = torch.nn.ModuleList([ours, late])
    out["set_decode"] = set_decode(model, True)
    out["decode_flags"] = [g.decode for g in model.modules() if isinstance(g, BalancedGate)]

    missing = stock_moe(ep_size=2)  # EP 2 in a world of 1: never set up
    install_gate(missing, "laser")
    try:
        with torch.no_grad():
            missing(x)
        out["missing_ep_group"] = "no error"
    except RuntimeError as err:
        out["missing_ep_group"] = str(err)
    try:
        install_gate(stock_moe(), "token_drop", load_scope="global")
        out["global_scope_for_token_drop"] = "no error"
    except Exception as err:
        out["global_scope_for_token_drop"] = f"{type(err).__name__}: {err}"
    return out


def _rank_main(rank: int, world: int) -> dict:
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from deepspeed_patch import init_distributed_cpu

    start = time.monotonic()
    init_distributed_cpu(timeout_s=COLLECTIVE_TIMEOUT_S)
    results: dict = {}
    try:
        import deepspeed.comm.comm as ds_comm  # the module whose global cdb is the backend
        import deepspeed.ops
        from deepspeed.utils import groups

        results["shm_off"] = (
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
            and ds_comm.cdb.shm_comm_op is None
            and dist.get_backend() == "gloo"
        )
        if world == 1:
            results["install"] = _install_cases()
        for ep in CONFIGS[world]:
            results[ep] = {case: _layer_case(rank, world, ep, case) for case in CASES}
            ep_group = groups._get_expert_parallel_group(f"ep_size_{ep}")
            results[ep]["stock"] = {k: _stock_case(rank, world, ep_group, k) for k in (1, 2, 4)}
        if world in MEGATRON_WORLDS:
            results["megatron"] = _megatron_cases(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    results["seconds"] = time.monotonic() - start
    return results


# ----------------------------------------------------------------------------- in pytest


@functools.lru_cache(maxsize=None)
def _world(world: int) -> list[dict]:
    return run_workers(_rank_main, world, timeout_s=200)


def test_init_distributed_cpu_skips_the_shm_op():
    for world in (1, 2):
        assert all(r["shm_off"] for r in _world(world))


@pytest.mark.parametrize("world,ep", WORLD_EP)
@pytest.mark.parametrize("case", list(CASES))
def test_moe_layer_matches_dense_reference(world, ep, case):
    for rank, result in enumerate(_world(world)):
        r = result[ep][case]
        assert r["sparse_invariants"] == "ok", f"rank {rank}: {r['sparse_invariants']}"
        assert r["dense_invariants"] == "ok", f"rank {rank}: {r['dense_invariants']}"
        assert r["max_abs_err"] <= ATOL, f"rank {rank}: {r}"
        assert r["dense_max_abs_err"] <= ATOL, f"rank {rank}: {r}"
        assert r["num_tokens"] == 0 or r["output_scale"] > 0.1, f"rank {rank}: degenerate {r}"
        assert r["dense_equals_sparse"], f"rank {rank}: dense and sparse tuples disagree: {r}"
        assert r["matches_policy"], f"rank {rank}: gate decision != moebalance policy: {r}"
        assert r["unused_routed_nowhere"], f"rank {rank}: {r}"
        assert r["exp_counts_are_loads"], f"rank {rank}: {r}"


@pytest.mark.parametrize("world,ep", WORLD_EP)
@pytest.mark.parametrize("case", list(CASES))
def test_capacity_is_agreed_over_the_ep_group(world, ep, case):
    results = [result[ep][case] for result in _world(world)]
    for rank, r in enumerate(results):
        group = r["ep_ranks"]
        assert len(group) == ep and rank in group
        agreed = max(1, max(results[g]["need"] for g in group))
        assert r["capacity"] == r["dense_capacity"] == agreed, r
        # rows: k for fixed-k policies, max(k, experts of the busiest token) otherwise
        assert r["rows"] == max(TOPK, r["max_per_token"]), r


@pytest.mark.parametrize("world,ep", WORLD_EP)
def test_cases_exercise_what_they_claim(world, ep):
    """Guards the tests above: the balancing cases must change routing, drops must drop, the
    uneven token counts must make the local needs differ, the empty rank must be empty."""
    runs = [result[ep] for result in _world(world)]

    def total(case, key):
        return sum(r[case][key] for r in runs)

    assert total("topk", "rows_not_k") == 0 and total("topk", "differs_from_vanilla") == 0
    assert total("laser", "differs_from_vanilla") > 0 and total("laser", "rows_not_k") == 0
    assert total("laser_fast_global", "differs_from_vanilla") > 0
    assert total("laser_fast_global", "rows_not_k") == 0
    assert total("token_drop", "rows_not_k") > 0 and total("token_drop", "rows_more_than_k") == 0
    assert total("token_drop_decode", "differs_from_vanilla") == 0
    assert total("token_drop_used_token", "num_unused") > 0
    assert total("expanded_drop", "rows_not_k") > 0
    assert max(r["expanded_drop_capped"]["max_per_token"] for r in runs) <= 3
    assert len({r["topk"]["num_tokens"] for r in runs}) == min(world, 4)
    if world > 1:
        assert runs[-1]["token_drop_empty"]["num_tokens"] == 0
        assert total("expanded_drop", "rows_more_than_k") > 0  # rank-local expansion: rows > k
        assert max(r["expanded_drop"]["rows"] for r in runs) > TOPK
    if ep > 1:
        assert len({r["token_drop"]["need"] for r in runs}) > 1  # C agreement mattered


@pytest.mark.parametrize("world,ep", WORLD_EP)
@pytest.mark.parametrize("k", (1, 2, 4))
def test_vanilla_gate_matches_deepspeed_topk_gate(world, ep, k):
    for rank, result in enumerate(_world(world)):
        r = result[ep]["stock"][k]
        stock_c, our_c = r["sparse_capacity"]
        assert r["shares_wg"], r
        assert r["sparse_same_routing"] and r["sparse_same_counts"], f"rank {rank}: {r}"
        assert r["dense_same_routing"], f"rank {rank}: {r}"
        if k == 1:
            # DeepSpeed's top1gating clamps the EP-agreed C to the rank's own token count
            # (min(new_capacity, S)), so with uneven ranks its C differs across the EP group;
            # BalancedGate keeps the agreed C.
            assert stock_c == min(our_c, r["num_tokens"]), f"rank {rank}: {r}"
        else:
            assert stock_c == our_c, f"rank {rank}: {r}"
        if k <= 2:  # top1/top2gating lay out routes choice-major, as BalancedGate does
            assert r["sparse_identical_tuple"], f"rank {rank}: {r}"
            assert r["dense_identical"] or stock_c != our_c, f"rank {rank}: {r}"


@pytest.mark.parametrize("world", MEGATRON_WORLDS)
@pytest.mark.parametrize("case", list(MEGATRON_CASES))
def test_same_decisions_as_megatron_router(world, case):
    for rank, result in enumerate(_world(world)):
        r = result["megatron"][case]
        assert r["same_routing"], f"rank {rank}: BalancedGate != megatron_patch router"
        assert r["same_after_tuple"], f"rank {rank}: 7-tuple round trip changed the decision"


def test_install_helpers():
    r = _world(1)[0]["install"]
    assert r["randomness_defaults_on"] and r["disabled"] == 1 and r["randomness_off"], r
    assert r["rng_kept"] and r["same_keys"], r
    assert r["setup_count"] == (1, 0), r
    assert r["before_setup_identical"] and r["after_setup_identical"], r
    assert r["gate_type"] == "BalancedGate" and r["ep_group_set"] and r["after_setup_ep_group"], r
    assert r["set_decode"] == 2 and r["decode_flags"] == [True, True], r
    assert "setup_expert_parallel" in r["missing_ep_group"], r
    assert r["global_scope_for_token_drop"].startswith("ConfigError"), r


def test_check_gate_output_rejects_broken_tuples():
    """The checker catches what would silently corrupt outputs or abort the all-to-all."""
    import torch

    from deepspeed_patch import GateOutputError, check_gate_output, gate_output
    from moebalance import GateConfig, route

    logits = torch.randn(10, EXPERTS, generator=torch.Generator().manual_seed(0))
    decision = route("topk", logits, GateConfig(EXPERTS, TOPK))
    good = gate_output(decision, TOPK, variable_experts_per_token=False)
    assert check_gate_output(good, num_tokens=10, num_experts=EXPERTS) == int(good[1])
    dense = gate_output(decision, TOPK, sparse=False)
    check_gate_output(dense, num_tokens=10, num_experts=EXPERTS)

    def broken(i, value):
        out = list(good)
        out[i] = value
        return tuple(out)

    idx, loc, gates = good[3].clone(), good[4].clone(), good[5].clone()
    # the second route of token 0 moved onto the slot of another route of the same expert
    e = int(idx[0, 0])
    other = (idx == e).nonzero()[1]
    collide_idx, collide_loc = idx.clone(), loc.clone()
    collide_idx[tuple(other)] = idx[0, 0]
    collide_loc[tuple(other)] = loc[0, 0]
    dropped_with_weight = idx.clone()
    dropped_with_weight[1, 0] = -1
    cases = {
        "outside [0, C=": broken(4, torch.where(idx >= 0, loc + int(good[1]), loc)),
        "share an (expert, location) slot": broken(3, collide_idx)[:4] + (collide_loc,) + good[5:],
        "must be torch.int32": broken(3, idx.long()),
        "must carry gate 0": broken(3, dropped_with_weight),
        "exp_counts": broken(6, torch.zeros(EXPERTS, dtype=torch.int64)),
        "expert indices": broken(3, torch.where(idx == e, -2, idx).to(torch.int32)),
    }
    for message, output in cases.items():
        with pytest.raises(GateOutputError, match=re.escape(message)):
            check_gate_output(output, num_tokens=10, num_experts=EXPERTS)
    two_tokens = dense[2].clone()
    two_tokens[1] |= two_tokens[0]
    with pytest.raises(GateOutputError, match="more than one token"):
        check_gate_output(
            (dense[0], dense[1], two_tokens, dense[3]), num_tokens=10, num_experts=EXPERTS
        )

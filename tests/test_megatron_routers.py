"""Megatron-Core adapter (megatron_patch): routers, injection and CPU shims, on real gloo ranks.

One spawn per world size (1, 2, 4) runs every case of that world inside the ranks and returns
plain numbers; the tests below read them. Each case builds a tiny MoELayer (hidden 32, 8
experts, top-2, fp32, local spec, SequentialMLP) and checks:

- routers vs stock ``TopKRouter``: ``make_router_class("topk")`` gives bit-identical (probs,
  routing_map) for softmax post / pre, sigmoid with expert bias, group-limited, sqrt-softplus,
  with a capacity factor of E, and with a padding mask (world 1);
- MoELayer forward vs a dense reference built from the layer's own routing decision with all
  experts' weights all-gathered to every rank, for each router x dispatcher (alltoall,
  allgather), and the decision vs the moebalance policy called directly;
- ``apply_cpu_shims`` is a no-op when CUDA is reported available, and idempotent (world 1);
- ``with_router`` / ``swap_routers`` reproduce the stock layer exactly.
"""

from __future__ import annotations

import functools

import pytest

from mp_utils import init_gloo, run_workers

pytestmark = pytest.mark.slow

WORLD_SIZES = (1, 2, 4)
DISPATCHERS = ("alltoall", "allgather")
HIDDEN, FFN, EXPERTS, TOPK, SEQ, BATCH = 32, 16, 8, 2, 8, 3
ATOL = 1e-5

# name -> (policy, params, load_scope, padded)
LAYER_CASES = {
    "topk": ("topk", None, "local", False),
    "laser": ("laser", None, "local", False),
    "laser_global": ("laser", None, "global", False),
    "laser_fast_global": ("laser_fast", None, "global", False),
    "token_drop": ("token_drop", {"capacity_factor": 1.0}, "local", False),
    "expanded_drop": ("expanded_drop", {"capacity_factor": 1.0}, "local", False),
    "laser_global_padded": ("laser", None, "global", True),
    "token_drop_padded": ("token_drop", {"capacity_factor": 1.0}, "local", True),
}

# name -> TransformerConfig overrides for the stock-equality cases
STOCK_CASES = {
    "softmax": {},
    "pre_softmax": {"moe_router_pre_softmax": True},
    "sigmoid_expert_bias": {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": 2.5,
    },
    "group_limited": {"moe_router_num_groups": 4, "moe_router_group_topk": 2},
    "sigmoid_group_limited_bias": {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_num_groups": 4,
        "moe_router_group_topk": 2,
    },
    "sqrtsoftplus": {"moe_router_score_function": "sqrtsoftplus"},
    "capacity_factor_E": {"moe_expert_capacity_factor": float(EXPERTS)},
}


# ----------------------------------------------------------------------------- in the ranks


def _config(world: int, dispatcher: str, **overrides):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=world,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        use_cpu_initialization=True,
        add_bias_linear=False,
        params_dtype=torch.float32,
        **overrides,
    )


def _build_layer(config, router_cls=None):
    """An MoELayer from the local GPT layer spec, weights set deterministically: the gate is
    the same on every rank (as in a real model), each expert is distinct (seeded by its global
    index) so a token sent to the wrong rank would show."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_patch import with_router

    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    if router_cls is not None:
        spec = with_router(spec, router_cls)
    layer = spec.submodules.mlp(config=config)
    layer.set_layer_number(1)  # as TransformerLayer does
    layer.eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        # logits of std ~1: softmax neither flat nor one-hot, so LASER has flexible tokens
        layer.router.weight.copy_(0.2 * torch.randn(layer.router.weight.shape, generator=gen))
        for i, expert in enumerate(layer.experts.local_experts):
            gen = torch.Generator().manual_seed(100 + layer.local_expert_indices[i])
            for linear in (expert.linear_fc1, expert.linear_fc2):
                linear.weight.copy_(0.2 * torch.randn(linear.weight.shape, generator=gen))
    return layer


def _tokens(rank: int):
    import torch

    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=gen)


def _padding_mask(rank: int):
    """[batch, seq] bool, True = padding (Megatron's convention): a ragged right padding."""
    import torch

    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for b in range(BATCH):
        mask[b, SEQ - (b + rank) % 4 :] = True
    return mask


def _gathered_expert_weights(layer):
    """([E, F, H] fc1, [E, H, F] fc2) of all experts, all-gathered over the EP group."""
    import torch
    import torch.distributed as dist

    out = []
    for name in ("linear_fc1", "linear_fc2"):
        local = torch.stack(
            [getattr(e, name).weight.detach() for e in layer.experts.local_experts]
        ).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(layer.ep_group))]
        dist.all_gather(parts, local, group=layer.ep_group)
        out.append(torch.cat(parts))
    return out


def _dense_reference(layer, tokens, probs):
    """[T, H]: sum_e probs[t, e] * fc2_e(act(fc1_e(x_t))), every expert computed densely."""
    import torch

    fc1, fc2 = _gathered_expert_weights(layer)
    act = layer.experts.local_experts[0].activation_func
    x = tokens.reshape(-1, HIDDEN)
    hidden = act(torch.einsum("th,efh->etf", x, fc1))
    per_expert = torch.einsum("etf,ehf->eth", hidden, fc2)  # [E, T, H]
    return torch.einsum("te,eth->th", probs.to(per_expert.dtype), per_expert)


def _forward_capturing_routing(layer, tokens, padding_mask=None):
    """(output [T, H], probs [T, E], routing_map [T, E]) of one MoELayer forward."""
    import torch

    seen = {}

    def hook(module, args, output):
        seen["probs"], seen["routing_map"] = output

    handle = layer.router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out, bias = layer(tokens, padding_mask=padding_mask)
    finally:
        handle.remove()
    assert bias is None
    return out.reshape(-1, HIDDEN), seen["probs"], seen["routing_map"]


def _expected_routing(layer, tokens, name, params, load_scope, padding_mask):
    """What the moebalance policy decides for the valid tokens, called directly (the EP-global
    loads for load_scope='global' computed here independently: other ranks' vanilla counts),
    and what it would decide with per-rank loads."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from moebalance import RoutingContext, route

    router = layer.router
    with torch.no_grad():
        logits = router.gating(tokens).reshape(-1, EXPERTS)
    valid = torch.ones(logits.shape[0], dtype=torch.bool)
    if padding_mask is not None:
        valid = ~padding_mask.transpose(0, 1).reshape(-1)
    ctx = RoutingContext(ep_rank=router.ep_rank, ep_size=router.ep_size, layer=0)
    local_scope = route(name, logits[valid], router.gate, params, ctx)
    if load_scope == "global" and router.ep_size > 1:
        local = route("topk", logits[valid], router.gate, None, ctx).routing_map.sum(0).float()
        total = local.clone()
        dist.all_reduce(total, group=layer.ep_group)
        ctx = dataclasses.replace(ctx, expert_load=total - local)
        return route(name, logits[valid], router.gate, params, ctx), valid, logits, local_scope
    return local_scope, valid, logits, local_scope


def _layer_case(world, rank, dispatcher, case):
    import torch

    from megatron_patch import make_router_class, prepare_config

    name, params, load_scope, padded = LAYER_CASES[case]
    router_cls = make_router_class(name, params, load_scope=load_scope)
    config = prepare_config(_config(world, dispatcher), router_cls)
    layer = _build_layer(config, router_cls)
    tokens = _tokens(rank)
    mask = _padding_mask(rank) if padded else None
    out, probs, routing_map = _forward_capturing_routing(layer, tokens, mask)
    reference = _dense_reference(layer, tokens, probs)
    expected, valid, logits, local_scope = _expected_routing(
        layer, tokens, name, params, load_scope, mask
    )
    from moebalance import route

    vanilla = route("topk", logits, layer.router.gate)
    if config.moe_expert_capacity_factor is None:
        padded_rows_ok = torch.equal(routing_map[~valid], vanilla.routing_map[~valid])
    else:
        padded_rows_ok = not routing_map[~valid].any()
    per_token = routing_map.sum(1)
    return {
        "max_abs_err": float((out - reference).abs().max()),
        "output_scale": float(reference.abs().max()),
        "probs_dtype_ok": probs.dtype == logits.dtype and routing_map.dtype == torch.bool,
        "matches_policy": torch.equal(routing_map[valid], expected.routing_map)
        and torch.equal(probs[valid], expected.probs),
        "padded_rows_ok": bool(padded_rows_ok),
        "num_padded": int((~valid).sum()),
        "rows_not_k": int((per_token[valid] != TOPK).sum()),
        "rows_more_than_k": int((per_token[valid] > TOPK).sum()),
        "differs_from_vanilla": not torch.equal(routing_map[valid], vanilla.routing_map[valid]),
        "differs_from_local_scope": not torch.equal(routing_map[valid], local_scope.routing_map),
    }


def _stock_case(world, case):
    """make_router_class("topk") vs stock TopKRouter with identical weights: forward() with grad
    off and on, plus routing() with a padding mask."""
    import torch
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_patch import make_router_class

    config = _config(world, "alltoall", **STOCK_CASES[case])
    pgs = get_default_pg_collection()
    stock = TopKRouter(config=config, pg_collection=pgs).eval()
    ours = make_router_class("topk")(config=config, pg_collection=pgs).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(stock.weight.shape, generator=gen))
        if stock.expert_bias is not None:
            stock.expert_bias.copy_(0.5 * torch.randn(EXPERTS, generator=gen))
    ours.load_state_dict(stock.state_dict(), strict=True)
    tokens = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    same = True
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a, b = stock(tokens), ours(tokens)
        same &= torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with torch.no_grad():
        logits = stock.gating(tokens)
        mask = _padding_mask(0).transpose(0, 1)  # [seq, batch], as MoELayer passes it
        a, b = stock.routing(logits, padding_mask=mask), ours.routing(logits, padding_mask=mask)
    same_padded = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if config.moe_expert_capacity_factor is not None:
        # by design: with dynamic buffers padded tokens are routed nowhere (stock routes them)
        same_padded = None
    return {"identical": bool(same), "identical_padded": same_padded}


def _injection_case(world, rank, dispatcher):
    """with_router and swap_routers with the "topk" router reproduce the stock layer bit for
    bit."""
    import torch

    from megatron_patch import make_router_class, moe_layers, swap_routers

    vanilla = make_router_class("topk")

    config = _config(world, dispatcher)
    tokens = _tokens(rank)
    stock = _build_layer(config)
    injected = _build_layer(config, vanilla)
    keys_equal = list(stock.state_dict()) == list(injected.state_dict())
    injected.load_state_dict(stock.state_dict(), strict=True)
    with torch.no_grad():
        want = stock(tokens)[0]
        got_injected = injected(tokens)[0]
    model = torch.nn.ModuleList([stock, _build_layer(config)])
    rng_before = torch.get_rng_state()
    swapped = swap_routers(model, vanilla)
    rng_kept = torch.equal(rng_before, torch.get_rng_state())
    with torch.no_grad():
        got_swapped = model[0](tokens)[0]
    return {
        "with_router_type": type(injected.router).__name__,
        "with_router_identical": keys_equal and torch.equal(want, got_injected),
        "swapped": swapped,
        "swap_types": sorted({type(layer.router).__name__ for layer in moe_layers(model)}),
        "swap_identical": torch.equal(want, got_swapped),
        "swap_layer_number": model[0].router.layer_number,
        "swap_rng_kept": rng_kept,
    }


def _shim_noop_case():
    """apply_cpu_shims with torch.cuda.is_available() reporting True must patch nothing."""
    import torch
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megatron_patch import cpu_shims

    def snapshot():
        return (
            torch.cuda.current_device,
            MoEAlltoAllTokenDispatcher.__dict__["cuda_dtoh_stream"],
            MoEAlltoAllTokenDispatcher.__dict__["_maybe_dtoh_and_synchronize"],
        )

    before = snapshot()
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        returned_on_cuda = cpu_shims.apply_cpu_shims()
    finally:
        torch.cuda.is_available = real_is_available
    noop = returned_on_cuda == () and snapshot() == before and cpu_shims.cpu_shims_applied() == ()
    first = cpu_shims.apply_cpu_shims()
    patched = snapshot()
    second = cpu_shims.apply_cpu_shims()
    idempotent = first == second and snapshot() == patched and patched != before
    return {"noop_on_cuda": bool(noop), "idempotent": bool(idempotent), "patches": list(first)}


def _config_errors(world):
    """Router construction errors that must be explicit (ConfigError), not dispatcher crashes."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_patch import make_router_class
    from moebalance import ConfigError

    out = {}
    try:
        config = _config(world, "alltoall")
        token_drop = make_router_class("token_drop")
        token_drop(config=config, pg_collection=get_default_pg_collection())
        out["token_drop_without_capacity_factor"] = "no error"
    except ConfigError as err:
        out["token_drop_without_capacity_factor"] = f"ConfigError: {err}"
    try:
        make_router_class("token_drop", load_scope="global")
        out["global_scope_for_token_drop"] = "no error"
    except ConfigError as err:
        out["global_scope_for_token_drop"] = f"ConfigError: {err}"
    return out


def _rank_main(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo()
    results: dict = {}
    try:
        if world == 1:
            results["shims"] = _shim_noop_case()  # before anything else patches
        from megatron_patch import apply_cpu_shims

        apply_cpu_shims()
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
        if world == 1:
            results["stock"] = {case: _stock_case(world, case) for case in STOCK_CASES}
            results["errors"] = _config_errors(world)
        results["layer"] = {
            f"{dispatcher}/{case}": _layer_case(world, rank, dispatcher, case)
            for dispatcher in DISPATCHERS
            for case in LAYER_CASES
        }
        results["inject"] = {d: _injection_case(world, rank, d) for d in DISPATCHERS}
        dist.barrier()
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return results


# ----------------------------------------------------------------------------- in pytest


@functools.lru_cache(maxsize=None)
def _world(world: int) -> list[dict]:
    return run_workers(_rank_main, world, timeout_s=240)


@pytest.mark.parametrize("case", sorted(STOCK_CASES))
def test_vanilla_router_identical_to_stock_topk_router(case):
    result = _world(1)[0]["stock"][case]
    assert result["identical"], f"{case}: TopkRouter.forward differs from TopKRouter.forward"
    assert result["identical_padded"] in (True, None), f"{case}: routing() with padding differs"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_moe_layer_matches_dense_reference(world, dispatcher, case):
    for rank, result in enumerate(_world(world)):
        r = result["layer"][f"{dispatcher}/{case}"]
        assert r["max_abs_err"] <= ATOL, f"rank {rank}: {r}"
        assert r["output_scale"] > 0.1, f"rank {rank}: degenerate output {r}"
        assert r["probs_dtype_ok"], f"rank {rank}: {r}"
        assert r["matches_policy"], f"rank {rank}: router decision != moebalance policy: {r}"
        assert r["padded_rows_ok"], f"rank {rank}: padded tokens mis-routed: {r}"
        if LAYER_CASES[case][3]:
            assert r["num_padded"] > 0 or rank == 0


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_balancing_routers_actually_change_routing(world, dispatcher):
    """Guards the dense-reference test: the cases must exercise what they claim."""
    layer = [result["layer"] for result in _world(world)]

    def total(case, key):
        return sum(r[f"{dispatcher}/{case}"][key] for r in layer)

    assert total("topk", "rows_not_k") == 0 and total("topk", "differs_from_vanilla") == 0
    assert total("laser", "differs_from_vanilla") > 0
    assert total("laser", "rows_not_k") == 0  # LASER keeps exactly k experts per token
    assert total("laser_fast_global", "differs_from_vanilla") > 0
    assert total("laser_fast_global", "rows_not_k") == 0
    assert total("token_drop", "rows_not_k") > 0  # tokens were dropped
    assert total("token_drop", "rows_more_than_k") == 0
    assert total("expanded_drop", "rows_not_k") > 0  # k changed per token
    assert total("laser", "differs_from_local_scope") == 0
    if world > 1:
        assert total("expanded_drop", "rows_more_than_k") > 0  # rank-local expansion
        assert total("laser_global", "differs_from_local_scope") > 0  # the all-reduce mattered


def test_apply_cpu_shims_is_noop_when_cuda_available_and_idempotent():
    shims = _world(1)[0]["shims"]
    assert shims["noop_on_cuda"], shims
    assert shims["idempotent"], shims
    assert "torch.cuda.current_device" in shims["patches"]


def test_variable_k_router_without_capacity_factor_is_a_config_error():
    errors = _world(1)[0]["errors"]
    assert "prepare_config" in errors["token_drop_without_capacity_factor"], errors
    assert errors["global_scope_for_token_drop"].startswith("ConfigError"), errors


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_with_router_and_swap_routers_reproduce_stock(world, dispatcher):
    for rank, result in enumerate(_world(world)):
        r = result["inject"][dispatcher]
        assert r["with_router_type"] == "TopkRouter", r
        assert r["with_router_identical"], f"rank {rank}: {r}"
        assert r["swapped"] == 2 and r["swap_types"] == ["TopkRouter"], r
        assert r["swap_identical"], f"rank {rank}: {r}"
        assert r["swap_layer_number"] == 1 and r["swap_rng_kept"], r


def _fail_on_rank_one(rank: int, world: int) -> None:
    import torch.distributed as dist

    init_gloo(timeout_s=120)
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 waits here for a rank that will never come


def test_run_workers_propagates_a_rank_failure_without_hanging():
    import time

    from mp_utils import WorkerError

    start = time.monotonic()
    with pytest.raises(WorkerError, match="deliberate failure on rank 1"):
        run_workers(_fail_on_rank_one, 2, timeout_s=100)
    assert time.monotonic() - start < 60  # not the collective or the run_workers timeout

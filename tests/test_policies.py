"""The policy registry (``moebalance.policies``) and what every policy promises: determinism,
half precision, no host synchronisation, clear errors, empty batches, gradients.

Per-policy references live in test_laser.py and test_capacity.py; the identity with
Megatron-Core's own routing in test_megatron_identity.py. No framework is imported here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from routing_cases import GATES, SETTINGS, gate_id, logits_for
from torch.utils._python_dispatch import TorchDispatchMode

from moebalance import (
    ConfigError,
    ExpandedDropParams,
    GateConfig,
    LaserParams,
    RoutingContext,
    TokenDropParams,
    check_routing,
    route,
)
from moebalance.policies import POLICIES, get_policy, laser, make_params, resolve_params


# ---------------------------------------------------------------- the registry
def _same(a, b) -> bool:
    return torch.equal(a.routing_map, b.routing_map) and torch.equal(a.probs, b.probs)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("laser_fast", LaserParams(),
         "router 'laser_fast' runs assignment='price', load_only=False; "
         "got LaserParams\\(assignment='blocked'\\) \\(router 'laser' runs these\\)"),
        ("laser_fast", LaserParams(pool_size=4, repair_rounds=3), "assignment='blocked'"),
        ("laser_fast", {"assignment": "blocked"}, "router 'laser_fast' runs assignment='price'"),
        ("laser_fast", LaserParams(assignment="price", per_layer={1: {"assignment": "blocked"}}),
         "per_layer\\[1\\]\\['assignment'\\]='blocked'"),
        ("load_only", LaserParams(), "router 'load_only' runs load_only=True; got "
         "LaserParams\\(load_only=False\\) \\(router 'laser' runs these\\)"),
        ("load_only", {"load_only": False}, "router 'load_only' runs load_only=True"),
        ("laser", LaserParams(load_only=True), "router 'laser' runs load_only=False; got "
         "LaserParams\\(load_only=True\\) \\(router 'load_only' runs these\\)"),
        ("laser", LaserParams(per_layer={0: {"load_only": True}}),
         "per_layer\\[0\\]\\['load_only'\\]=True"),
        ("laser", TokenDropParams(), "params for router 'laser' must be LaserParams or a dict"),
    ],
)
def test_parameters_never_change_what_a_router_runs(name, params, match):
    """A router's name says what runs: parameters (dataclass or dict) that contradict the
    router's preset are a one-line ConfigError in ``route`` and in ``resolve_params`` (which
    the adapters use), never a silent switch to another assignment."""
    gate = GateConfig(num_experts=8, topk=2)
    logits = logits_for(64, 8, 0, 2.0)
    with pytest.raises(ConfigError, match=match) as err:
        route(name, logits, gate, params, RoutingContext(layer=1))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=match):
        resolve_params(get_policy(name), params)
    if isinstance(params, dict):
        with pytest.raises(ConfigError, match=match):
            make_params(name, params)


def test_parameters_that_agree_with_the_preset_run_the_router():
    """A params object with the router's own values works and routes exactly as the dict
    form and the defaults do; the LASER routers really differ from one another."""
    gate = GateConfig(num_experts=16, topk=2)
    logits = logits_for(2000, 16, 1, 1.0)
    ctx = RoutingContext(ep_rank=1, ep_size=4)
    fast = route("laser_fast", logits, gate, LaserParams(assignment="price", pool_size=6), ctx)
    assert _same(fast, route("laser_fast", logits, gate, {"pool_size": 6}, ctx))
    assert _same(fast, laser(logits, gate, LaserParams(assignment="price", pool_size=6), ctx))
    blocked = route("laser", logits, gate, LaserParams(pool_size=6), ctx)
    assert _same(blocked, route("laser", logits, gate, {"pool_size": 6}, ctx))
    assert not _same(fast, blocked)  # the two assignments decide differently here
    load_only = route("load_only", logits, gate, LaserParams(load_only=True), ctx)
    assert _same(load_only, route("load_only", logits, gate, None, ctx))
    assert not _same(load_only, blocked)
    # the price assignment is a LaserParams field of the general router too
    assert _same(fast, route("laser", logits, gate, {"pool_size": 6, "assignment": "price"}, ctx))
    for policy in POLICIES.values():  # defaults agree with every preset
        assert resolve_params(policy, None) == policy.params()
        assert resolve_params(policy.name, policy.params()) == policy.params()


@given(
    T=st.integers(1, 500),
    E=st.sampled_from([2, 8, 16, 64, 128]),
    frac=st.floats(0.01, 1.0),
    ties=st.sampled_from([0, 1, 4]),
    largest=st.booleans(),
    sorted_=st.booleans(),
    with_inf=st.booleans(),
    seed=st.integers(0, 10_000),
)
@SETTINGS
def test_topk_nonnegative_equals_torch_topk(T, E, frac, ties, largest, sorted_, with_inf, seed):
    """The int32-view top-k returns exactly torch.topk's values and indices on non-negative
    floats, ties and +inf included (the policies' pools and price keys rely on it)."""
    from moebalance.policies.gate import topk_nonnegative

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=g) * 3
    if ties:
        x = (x * ties).round() / ties  # many exactly equal values
    x = torch.softmax(x, dim=1) if seed % 2 else x.abs() + 0.0  # a softmax, or shifted keys
    if with_inf:
        x = x.masked_fill(torch.rand(T, E, generator=g) < 0.2, float("inf"))
    n = max(1, min(E, int(frac * E)))
    want = torch.topk(x, n, dim=1, largest=largest, sorted=sorted_)
    got = topk_nonnegative(x, n, largest=largest, sorted=sorted_)
    assert torch.equal(got[1], want.indices)
    assert torch.equal(got[0], want.values)


@pytest.mark.parametrize("name", ["topk", "laser", "laser_fast", "load_only", "token_drop", "expanded_drop"])
def test_policies_are_deterministic_and_accept_half_precision(name):
    gate = GateConfig(num_experts=16, topk=4)
    logits = logits_for(300, 16, 4, 2.0)
    ctx = RoutingContext(ep_rank=1, ep_size=4)
    a, b = route(name, logits, gate, ctx=ctx), route(name, logits.clone(), gate, ctx=ctx)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.routing_map, b.routing_map)
    h = route(name, logits.bfloat16(), gate, ctx=ctx)
    assert h.probs.dtype == torch.bfloat16
    check_routing(h)


# ops that copy a device value to the host (a stream synchronisation on CUDA)
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select"}


class _HostSyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_SYNC_OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", GATES[:2] + GATES[4:5] + GATES[6:7], ids=gate_id)
@pytest.mark.parametrize(
    "name, params",
    [
        ("topk", None),
        ("laser", None),
        ("laser", {"min_score_ratio": 0.3, "expert_load": True}),
        ("laser_fast", {"price_rounds": 2}),
        ("load_only", None),
        ("token_drop", None),
        ("token_drop", {"drop_policy": "random", "scope": "device", "renormalize": True}),
        ("expanded_drop", {"max_experts_per_token": 3}),
    ],
)
def test_policies_never_synchronise_with_the_host(spec, name, params):
    """The policy functions (the hot path, after ``route``'s input validation) never read a
    tensor value on the host: no ``.item()``, no tensor used as a Python bool or index, no
    data-dependent shapes. On CUDA each of those would stall the stream."""
    spec = dict(spec)
    use_bias = spec.pop("bias", False)
    E, k = 32, 4
    gate = GateConfig(num_experts=E, topk=k, **spec)
    params = dict(params or {})
    load = torch.arange(E, dtype=torch.float32) * 3 if params.pop("expert_load", False) else None
    bias = torch.linspace(-0.5, 0.5, E) if use_bias else None
    ctx = RoutingContext(ep_rank=1, ep_size=4, expert_load=load, expert_bias=bias)
    policy = get_policy(name)
    resolved = policy.params(params)
    logits = logits_for(700, E, 3, 2.0)
    with torch.no_grad(), _HostSyncRecorder() as recorder:
        policy.fn(logits, gate, resolved, ctx)
    assert recorder.seen == [], f"{name} synchronised with the host via {recorder.seen}"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: route("nope", torch.zeros(2, 4), GateConfig(4, 2)), "unknown router 'nope'"),
        (lambda: GateConfig(num_experts=4, topk=5), "topk must be an integer in \\[1, num_experts=4\\]"),
        (lambda: GateConfig(num_experts=4, topk=0), "topk"),
        (lambda: route("laser", torch.zeros(2, 8), GateConfig(8, 4), {"pool_size": 3}), "pool_size \\(c\\) must be in \\[topk=4"),
        (lambda: TokenDropParams(capacity_factor=0), "capacity_factor \\(gamma\\) must be a finite number > 0"),
        (lambda: ExpandedDropParams(capacity_factor=-1.0), "capacity_factor"),
        (lambda: route("expanded_drop", torch.zeros(2, 6), GateConfig(6, 2), ctx=RoutingContext(ep_size=4)), "divisible by the EP size"),
        (lambda: route("topk", torch.tensor([[0.0, float("nan")]]), GateConfig(2, 1)), "NaN or Inf"),
        (lambda: route("topk", torch.zeros(3, 5), GateConfig(4, 2)), "shape \\[num_tokens, num_experts=4\\]"),
        (lambda: route("topk", torch.zeros(3, 4, dtype=torch.int64), GateConfig(4, 2)), "floating dtype"),
        (lambda: TokenDropParams(drop_policy="lifo"), "drop_policy must be one of"),
        (lambda: route("token_drop", torch.zeros(2, 4), GateConfig(4, 2), {"gamma": 1}), "unknown TokenDropParams field"),
        (lambda: RoutingContext(ep_rank=2, ep_size=2), "ep_rank"),
        (lambda: route("laser", torch.zeros(2, 8), GateConfig(8, 2), {"repair_rounds": -1}), "repair_rounds must be an integer >= 0"),
        (lambda: LaserParams(min_block=1.5), "min_block must be an integer >= 1"),
        (lambda: LaserParams(repair_rounds=True), "repair_rounds must be an integer >= 0"),
        (lambda: LaserParams(block_ratio=True), "block_ratio must be in \\(0, 1\\]"),
        (lambda: LaserParams(block_ratio=0), "block_ratio must be in \\(0, 1\\]"),
        (lambda: LaserParams(assignment="auction"), "assignment must be 'blocked' or 'price'"),
        (lambda: route("laser_fast", torch.zeros(2, 8), GateConfig(8, 2), {"price_rounds": 0}), "price_rounds must be an integer >= 1"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize("name", ["topk", "laser", "laser_fast", "load_only", "token_drop", "expanded_drop"])
def test_zero_tokens_give_an_empty_routing(name):
    """A rank whose batch ran out still routes (and stays in lockstep)."""
    gate = GateConfig(num_experts=8, topk=2)
    r = route(name, torch.zeros(0, 8), gate, ctx=RoutingContext(ep_rank=1, ep_size=2))
    assert r.probs.shape == (0, 8) and r.routing_map.shape == (0, 8)
    check_routing(r)


@pytest.mark.parametrize("pre_softmax", [False, True])
@pytest.mark.parametrize("name", ["topk", "laser", "laser_fast", "load_only", "token_drop", "expanded_drop"])
def test_weights_carry_the_gate_gradient(name, pre_softmax):
    """With autograd on (training, or a router under a grad-enabled caller), the routing
    weights stay differentiable in the logits whatever the assignment did without autograd:
    for the routers that keep the gate's weights at the chosen experts, the gradient equals a
    dense reference's (softmax over all experts, or over the chosen logits, masked to the map)."""
    gate = GateConfig(num_experts=16, topk=4, pre_softmax=pre_softmax)
    logits = logits_for(300, 16, 7, 2.0).requires_grad_(True)
    ctx = RoutingContext(ep_rank=1, ep_size=4)
    routing = route(name, logits, gate, ctx=ctx)
    upstream = torch.randn(routing.probs.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((routing.probs * upstream).sum(), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if name in ("topk", "laser", "laser_fast", "load_only"):
        ref_logits = logits.detach().double().requires_grad_(True)
        chosen = routing.routing_map
        if pre_softmax:
            ref = torch.softmax(ref_logits, dim=-1) * chosen
        else:
            ref = torch.softmax(ref_logits.masked_fill(~chosen, float("-inf")), dim=-1)
        (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), ref_logits)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)

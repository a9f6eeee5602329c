"""Capacity-aware token drop and expanded drop (``moebalance.policies.capacity``) against
float64 loop references."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_cases import SETTINGS, logits_for

import pytest
from test_policies import _HostSyncRecorder

from moebalance import (
    ConfigError,
    ExpandedDropParams,
    GateConfig,
    LaserParams,
    RoutingContext,
    TokenDropParams,
    check_routing,
)
from moebalance.policies import expanded_drop, laser, token_drop, topk
from moebalance.policies.laser_routing import layout_tie_order
from moebalance.policies.capacity import expert_capacity, keep_top_per_column, keep_top_per_group
from moebalance.policies.gate import score_distribution


@given(
    T=st.integers(1, 200),
    n=st.integers(1, 6),
    capacity=st.integers(0, 220),
    levels=st.integers(1, 50),
    seed=st.integers(0, 1000),
)
@SETTINGS
def test_keep_top_per_column_matches_keep_top_per_group(T, n, capacity, levels, seed):
    """Every token a candidate of every column (few distinct priorities: many ties)."""
    g = torch.Generator().manual_seed(seed)
    pri = torch.randint(0, levels, (T, n), generator=g).float() / levels
    cols = torch.arange(n).expand(T, n)
    expected = keep_top_per_group(cols, pri, 1, capacity, n)
    assert torch.equal(keep_top_per_column(pri, capacity), expected)


# ---------------------------------------------------------------- token drop
def token_drop_reference(logits, gate, gamma, policy, scope="expert", ep_size=1, groups=None):
    """float64 loop reference: per expert (or per rank group) keep the top-C by priority;
    ``groups`` [E]: the experts' groups for the device scope (default: contiguous)."""
    x = logits.double()
    T, E = x.shape
    k = gate.topk
    top = torch.topk(x, k, dim=1)[1]
    rmap = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    S = torch.softmax(x, dim=1)
    group = 1 if scope == "expert" else E // ep_size
    cap = math.ceil(group * gamma * T * k / E)
    keep = torch.zeros_like(rmap)
    members = [range(g0, g0 + group) for g0 in range(0, E, group)]
    if groups is not None:
        members = [[e for e in range(E) if groups[e] == g] for g in range(ep_size)]
    for experts in members:
        if groups is not None:
            cap = math.ceil(len(experts) * gamma * T * k / E)
        entries = [(t, e) for t in range(T) for e in experts if rmap[t, e]]
        if policy == "score":
            entries.sort(key=lambda te: (-S[te].item(), te[0]))
        elif policy == "order":
            entries.sort(key=lambda te: te[0])
        elif policy == "reverse":
            entries.sort(key=lambda te: -te[0])
        for t, e in entries[:cap]:
            keep[t, e] = True
    return rmap, keep, cap


@given(
    T=st.integers(1, 120),
    E=st.sampled_from([4, 8]),
    k=st.integers(1, 3),
    gamma=st.floats(0.3, 2.5),
    policy=st.sampled_from(["score", "order", "reverse"]),
    seed=st.integers(0, 10_000),
    skew=st.floats(0, 4),
)
@SETTINGS
def test_token_drop_matches_float64_reference(T, E, k, gamma, policy, seed, skew):
    gate = GateConfig(num_experts=E, topk=k)
    logits = logits_for(T, E, seed, skew)
    r = token_drop(logits, gate, TokenDropParams(capacity_factor=gamma, drop_policy=policy))
    vmap, want, cap = token_drop_reference(logits, gate, gamma, policy)
    assert r.capacity == cap == expert_capacity(T, gate, gamma)
    check_routing(r, capacity=cap, max_per_token=k)
    if policy != "score":  # score ties between float32 and float64 are not meaningful
        assert torch.equal(r.routing_map, want)
    else:
        assert (r.routing_map.sum(0) == want.sum(0)).all()
        assert (r.routing_map == want).float().mean() > 0.99
    # dropped = sum_e relu(L_e - C), kept weights are the vanilla ones
    load = vmap.sum(0)
    assert int(r.num_dropped) == int((load - cap).clamp(min=0).sum())
    v = topk(logits, gate)
    assert torch.equal(r.probs, v.probs * r.routing_map)


@given(T=st.integers(1, 150), gamma=st.floats(0.2, 2.0), seed=st.integers(0, 1000))
@SETTINGS
def test_token_drop_keeps_the_highest_scores_per_expert(T, gamma, seed):
    E, k = 8, 2
    gate = GateConfig(num_experts=E, topk=k)
    logits = logits_for(T, E, seed, 2.0)
    r = token_drop(logits, gate, TokenDropParams(capacity_factor=gamma))
    v = topk(logits, gate)
    S = score_distribution(logits, gate)
    dropped = v.routing_map & ~r.routing_map
    for e in range(E):
        if dropped[:, e].any():
            assert S[r.routing_map[:, e], e].min() >= S[dropped[:, e], e].max()


def test_token_drop_device_scope_random_policy_and_renormalize():
    E, k, ep = 8, 2, 4
    gate = GateConfig(num_experts=E, topk=k)
    logits = logits_for(256, E, 5, 3.0)
    ctx = RoutingContext(ep_rank=1, ep_size=ep, seed=7)
    dev = token_drop(logits, gate, TokenDropParams(capacity_factor=1.0, scope="device"), ctx)
    per_rank = dev.routing_map.sum(0).view(ep, -1).sum(1)
    assert int(per_rank.max()) <= math.ceil(2 * 1.0 * 256 * k / E)
    vmap, want, _ = token_drop_reference(logits, gate, 1.0, "score", "device", ep)
    assert (dev.routing_map.sum(0).view(ep, -1).sum(1) == want.sum(0).view(ep, -1).sum(1)).all()
    p = TokenDropParams(capacity_factor=0.8, drop_policy="random")
    a, b = token_drop(logits, gate, p, ctx), token_drop(logits, gate, p, ctx)
    assert torch.equal(a.routing_map, b.routing_map)
    c = token_drop(logits, gate, p, RoutingContext(ep_rank=1, ep_size=ep, seed=8))
    assert not torch.equal(a.routing_map, c.routing_map)
    check_routing(a, capacity=a.capacity)
    rn = token_drop(logits, gate, TokenDropParams(capacity_factor=0.8, renormalize=True))
    v = topk(logits, gate)
    kept_any = rn.routing_map.any(1)
    torch.testing.assert_close(rn.probs.sum(1)[kept_any], v.probs.sum(1)[kept_any])


def test_token_drop_prefill_only_leaves_decode_untouched():
    gate = GateConfig(num_experts=8, topk=2)
    logits = logits_for(64, 8, 0, 4.0)
    v = topk(logits, gate)
    p = TokenDropParams(capacity_factor=0.5)
    d = token_drop(logits, gate, p, RoutingContext(decode=True))
    assert torch.equal(d.routing_map, v.routing_map)
    d2 = token_drop(logits, gate, TokenDropParams(capacity_factor=0.5, prefill_only=False), RoutingContext(decode=True))
    assert d2.routing_map.sum() < v.routing_map.sum()


# ---------------------------------------------------------------- expanded drop
def expanded_drop_reference(logits, gate, gamma, ep_rank, ep_size, local=None):
    """float64 loop reference; ``local`` [E] bool: this rank's experts (default: contiguous)."""
    x = logits.double()
    T, E = x.shape
    k = gate.topk
    top = torch.topk(x, k, dim=1)[1]
    cand = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    if local is None:
        per = E // ep_size
        cand[:, ep_rank * per : (ep_rank + 1) * per] = True
    else:
        cand[:, local] = True
    S = torch.softmax(x, dim=1)
    cap = math.ceil(gamma * T * k / E)
    keep = torch.zeros_like(cand)
    for e in range(E):
        ts = sorted((t for t in range(T) if cand[t, e]), key=lambda t: (-S[t, e].item(), t))
        keep[ts[:cap], e] = True
    w = S * keep
    w = w / w.sum(1, keepdim=True).clamp(min=1e-300)
    return keep, w, cap


@given(
    T=st.integers(1, 100),
    E=st.sampled_from([4, 8]),
    k=st.integers(1, 3),
    ep_size=st.sampled_from([1, 2, 4]),
    gamma=st.floats(0.3, 2.5),
    seed=st.integers(0, 10_000),
)
@SETTINGS
def test_expanded_drop_matches_float64_reference(T, E, k, ep_size, gamma, seed):
    gate = GateConfig(num_experts=E, topk=k)
    rank = seed % ep_size
    logits = logits_for(T, E, seed, 2.0)
    ctx = RoutingContext(ep_rank=rank, ep_size=ep_size)
    r = expanded_drop(logits, gate, ExpandedDropParams(capacity_factor=gamma), ctx)
    keep, w, cap = expanded_drop_reference(logits, gate, gamma, rank, ep_size)
    check_routing(r, capacity=cap)
    assert (r.routing_map == keep).float().mean() > 0.99
    assert (r.routing_map.sum(0) == keep.sum(0)).all()
    if torch.equal(r.routing_map, keep):
        torch.testing.assert_close(r.probs.double(), w, atol=1e-6, rtol=1e-5)
    # only rank-local experts are added
    v = topk(logits, gate)
    per = E // ep_size
    added = r.routing_map & ~v.routing_map
    assert not added[:, : rank * per].any() and not added[:, (rank + 1) * per :].any()


def test_expanded_drop_at_ep1_is_expert_choice_and_max_experts_caps_rows():
    E, k, T = 8, 2, 64
    gate = GateConfig(num_experts=E, topk=k)
    logits = logits_for(T, E, 2, 1.0)
    r = expanded_drop(logits, gate, ExpandedDropParams(capacity_factor=1.0))
    C = expert_capacity(T, gate, 1.0)
    assert (r.routing_map.sum(0) == C).all()  # every expert is local: each takes exactly C
    m = expanded_drop(logits, gate, ExpandedDropParams(capacity_factor=1.0, max_experts_per_token=2))
    assert int(m.experts_per_token().max()) <= 2
    assert not (m.routing_map & ~r.routing_map).any()


@given(seed=st.integers(0, 10_000), frac=st.floats(0, 1))
@SETTINGS
def test_masked_equals_where_bit_for_bit(seed, frac):
    """The int32 masking in capacity policies is torch.where(keep, x, 0.0) to the bit, on
    subnormals, signed zeros, infinities and NaN too."""
    from moebalance.policies.capacity import _masked

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=gen) * torch.logspace(-44, 30, 32)  # subnormal .. huge
    x[0, :6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45])
    keep = torch.rand(64, 32, generator=gen) < frac
    got, want = _masked(x, keep), torch.where(keep, x, 0.0)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    half = x.bfloat16()
    assert torch.equal(_masked(half, keep).view(torch.int16), torch.where(keep, half, 0.0).view(torch.int16))


# ---------------------------------------------------------------- expert layouts (replicas)
def contiguous_layout(E: int, ep: int, rank: int) -> dict:
    """The default layout given explicitly: expert e in group e // (E/EP), local = own group."""
    group = torch.arange(E) // (E // ep)
    return dict(local_experts=group == rank, expert_group=group)


def scattered_layout(E: int, ep: int, rank: int, seed: int) -> dict:
    """A non-contiguous layout: random groups, and replicas of random other experts here."""
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(0, ep, (E,), generator=g)
    local = (group == rank) | (torch.rand(E, generator=g) < 0.3)
    return dict(local_experts=local, expert_group=group)


def _bits(r):
    return r.probs.view(torch.int16 if r.probs.element_size() == 2 else torch.int32), r.routing_map


@given(
    T=st.integers(0, 150),
    E=st.sampled_from([4, 8, 16]),
    k=st.integers(1, 3),
    ep_size=st.sampled_from([1, 2, 4]),
    gamma=st.floats(0.3, 2.5),
    seed=st.integers(0, 10_000),
    half=st.booleans(),
)
@settings(SETTINGS, max_examples=min(SETTINGS.max_examples, 15))  # 9 policies an example
def test_an_explicit_contiguous_layout_changes_nothing(T, E, k, ep_size, gamma, seed, half):
    """Expanded drop, token drop (both scopes, every drop policy) and load-only decide bit for
    bit the same with the contiguous layout given explicitly as without a layout."""
    gate = GateConfig(num_experts=E, topk=k)
    rank = seed % ep_size
    logits = logits_for(T, E, seed, 2.0, torch.bfloat16 if half else torch.float32)
    plain = RoutingContext(ep_rank=rank, ep_size=ep_size, seed=seed)
    given_layout = RoutingContext(ep_rank=rank, ep_size=ep_size, seed=seed, **contiguous_layout(E, ep_size, rank))
    load = torch.arange(E, dtype=torch.float32) % 3 * 4
    loaded = RoutingContext(ep_rank=rank, ep_size=ep_size, expert_load=load)
    loaded_layout = RoutingContext(ep_rank=rank, ep_size=ep_size, expert_load=load, **contiguous_layout(E, ep_size, rank))
    runs = [(expanded_drop, ExpandedDropParams(capacity_factor=gamma, max_experts_per_token=seed % 4 or None))]
    runs += [
        (token_drop, TokenDropParams(capacity_factor=gamma, scope="device", drop_policy=policy))
        for policy in ("score", "order", "random")
    ]
    for fn, params in runs:
        a, b = fn(logits, gate, params, plain), fn(logits, gate, params, given_layout)
        assert all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b))), (fn.__name__, params)
        assert a.capacity == b.capacity and torch.equal(a.num_dropped, b.num_dropped)
    only = LaserParams(load_only=True)
    for ctx, ctx_layout in ((plain, given_layout), (loaded, loaded_layout)):
        a, b = laser(logits, gate, only, ctx), laser(logits, gate, only, ctx_layout)
        assert all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b)))
    rotated = (torch.arange(E) + rank * (E // ep_size)) % E
    assert torch.equal(layout_tie_order(ep_size=ep_size, ep_rank=rank, **contiguous_layout(E, ep_size, rank)), rotated)


@given(
    T=st.integers(1, 100),
    E=st.sampled_from([4, 6, 8]),
    k=st.integers(1, 3),
    ep_size=st.sampled_from([2, 3, 4]),
    gamma=st.floats(0.3, 2.5),
    seed=st.integers(0, 10_000),
)
@SETTINGS
def test_expanded_drop_offers_exactly_the_layouts_local_experts(T, E, k, ep_size, gamma, seed):
    """With a non-contiguous layout (E need not divide by EP) the candidates are the top-k
    plus ``local_experts``: float64 reference, and with a capacity of every token (gamma >=
    E / k) the map is exactly top-k or local."""
    gate = GateConfig(num_experts=E, topk=k)
    rank = seed % ep_size
    layout = scattered_layout(E, ep_size, rank, seed)
    local = layout["local_experts"]
    logits = logits_for(T, E, seed, 2.0)
    ctx = RoutingContext(ep_rank=rank, ep_size=ep_size, **layout)
    r = expanded_drop(logits, gate, ExpandedDropParams(capacity_factor=gamma), ctx)
    keep, w, cap = expanded_drop_reference(logits, gate, gamma, rank, ep_size, local)
    check_routing(r, capacity=cap)
    assert (r.routing_map == keep).float().mean() > 0.99
    assert (r.routing_map.sum(0) == keep.sum(0)).all()
    v = topk(logits, gate)
    assert not (r.routing_map & ~v.routing_map)[:, ~local].any()  # nothing added off the layout
    every = expanded_drop(logits, gate, ExpandedDropParams(capacity_factor=E / k), ctx)
    assert torch.equal(every.routing_map, v.routing_map | local)


@given(
    T=st.integers(1, 120),
    E=st.sampled_from([4, 6, 8]),
    k=st.integers(1, 3),
    ep_size=st.sampled_from([2, 3, 4]),
    gamma=st.floats(0.3, 2.0),
    policy=st.sampled_from(["order", "reverse", "random"]),
    seed=st.integers(0, 10_000),
)
@SETTINGS
def test_token_drop_device_scope_caps_the_layouts_groups(T, E, k, ep_size, gamma, policy, seed):
    """Device scope with ``expert_group``: each group of n experts keeps at most
    ceil(n * gamma * T * k / E) pairs, the ones the drop policy ranks first (loop reference)."""
    gate = GateConfig(num_experts=E, topk=k)
    rank = seed % ep_size
    layout = scattered_layout(E, ep_size, rank, seed)
    groups = layout["expert_group"]
    logits = logits_for(T, E, seed, 3.0)
    ctx = RoutingContext(ep_rank=rank, ep_size=ep_size, seed=seed, **layout)
    r = token_drop(logits, gate, TokenDropParams(capacity_factor=gamma, scope="device", drop_policy=policy), ctx)
    vmap, want, _ = token_drop_reference(logits, gate, gamma, "order", "device", ep_size, groups.tolist())
    per_group = torch.zeros(ep_size, dtype=torch.int64).index_add_(0, groups, r.routing_map.sum(0))
    wanted = torch.zeros(ep_size, dtype=torch.int64).index_add_(0, groups, want.sum(0))
    assert torch.equal(per_group, wanted)  # min(group load, group capacity), whatever the policy
    if policy != "random":  # the same tokens kept per group (one token's pairs in a group tie)
        ref = token_drop_reference(logits, gate, gamma, policy, "device", ep_size, groups.tolist())[1]
        by_group = lambda m: torch.zeros(T, ep_size, dtype=torch.int64).index_add_(1, groups, m.long())  # noqa: E731
        assert torch.equal(by_group(r.routing_map), by_group(ref))
    assert not (r.routing_map & ~vmap).any() and r.capacity is None
    assert int(r.num_dropped) == int((vmap & ~r.routing_map).sum())


def test_load_only_deals_its_ties_from_the_layouts_local_experts():
    """Zero loads, T k = 3 assignments over 8 experts: the three extra slots go to this rank's
    local experts first (interleaved layout: even experts on rank 1)."""
    E, ep = 8, 2
    gate = GateConfig(num_experts=E, topk=1)
    group = torch.arange(E) % 2 == 0
    layout = dict(local_experts=group, expert_group=group.long())
    r = laser(logits_for(3, E, 0), gate, LaserParams(load_only=True), RoutingContext(ep_rank=1, ep_size=ep, **layout))
    assert r.expert_load().tolist() == [1, 0, 1, 0, 1, 0, 0, 0]
    order = layout_tie_order(group, group.long(), 1, ep)
    assert order.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    r0 = laser(logits_for(3, E, 0), gate, LaserParams(load_only=True), RoutingContext(ep_rank=0, ep_size=ep, **{
        "local_experts": ~group, "expert_group": group.long()}))
    assert r0.expert_load().tolist() == [0, 1, 0, 1, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RoutingContext(local_experts=torch.ones(8, dtype=torch.bool)),
         "local_experts and expert_group must be given together"),
        (lambda: RoutingContext(local_experts=torch.ones(8), expert_group=torch.zeros(8, dtype=torch.int64)),
         "local_experts must be a torch.bool tensor of shape \\[num_experts\\] or None, got torch.float32"),
        (lambda: RoutingContext(local_experts=torch.ones(8, dtype=torch.bool), expert_group=torch.zeros(8)),
         "expert_group must be a torch.int64 tensor"),
        (lambda: RoutingContext(local_experts=[True] * 8, expert_group=torch.zeros(8, dtype=torch.int64)),
         "local_experts must be a torch.bool tensor .*got list"),
        (lambda: RoutingContext(local_experts=torch.ones(7, dtype=torch.bool),
                                expert_group=torch.zeros(8, dtype=torch.int64)).validate(GATE8),
         "local_experts must have shape \\[num_experts=8\\], got \\(7,\\)"),
        (lambda: RoutingContext(ep_size=2, local_experts=torch.ones(8, dtype=torch.bool),
                                expert_group=torch.arange(8) % 3).validate(GATE8),
         "expert_group must hold EP ranks in \\[0, ep_size=2\\), got min 0 and max 2"),
        (lambda: RoutingContext(ep_size=2, local_experts=torch.arange(8) < 2,
                                expert_group=torch.arange(8) % 2).validate(GATE8),
         "local_experts must hold every expert of this rank's group \\(ep_rank=0\\); missing \\[2, 4, 6\\]"),
        (lambda: RoutingContext(ep_size=3).validate(GATE8), "num_experts=8 must be divisible by the EP size"),
    ],
)
def test_bad_layouts_are_one_line_config_errors(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


GATE8 = GateConfig(num_experts=8, topk=2)


def test_a_layout_lifts_divisibility_and_its_device_values_are_not_read():
    group = torch.arange(8) % 3
    RoutingContext(ep_rank=1, ep_size=3, local_experts=group == 1, expert_group=group).validate(GATE8)
    meta = dict(local_experts=torch.empty(8, dtype=torch.bool, device="meta"),
                expert_group=torch.empty(8, dtype=torch.int64, device="meta"))
    RoutingContext(ep_size=3, **meta).validate(GATE8)  # shapes only: values are not read
    bad = RoutingContext(ep_size=2, local_experts=torch.zeros(8, dtype=torch.bool), expert_group=group)
    bad.validate(GATE8, check_values=False)
    with pytest.raises(ConfigError, match="expert_group must hold EP ranks"):
        bad.validate(GATE8)


@pytest.mark.parametrize(
    "fn, params",
    [
        (expanded_drop, ExpandedDropParams(max_experts_per_token=3)),
        (token_drop, TokenDropParams(scope="device", drop_policy="random")),
        (laser, LaserParams(load_only=True)),
    ],
)
def test_layout_policies_never_synchronise_with_the_host(fn, params):
    E = 32
    gate = GateConfig(num_experts=E, topk=4)
    ctx = RoutingContext(ep_rank=1, ep_size=4, expert_load=torch.arange(E) * 1.0, **scattered_layout(E, 4, 1, 0))
    logits = logits_for(700, E, 3, 2.0)
    with torch.no_grad(), _HostSyncRecorder() as recorder:
        fn(logits, gate, params, ctx)
    assert recorder.seen == [], f"{fn.__name__} synchronised with the host via {recorder.seen}"

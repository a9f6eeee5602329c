"""Capacity-aware token drop and expanded drop (``moebalance.policies.capacity``) against
float64 loop references."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from routing_cases import SETTINGS, logits_for

from moebalance import ExpandedDropParams, GateConfig, RoutingContext, TokenDropParams, check_routing
from moebalance.policies import expanded_drop, token_drop, topk
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
def token_drop_reference(logits, gate, gamma, policy, scope="expert", ep_size=1):
    """float64 loop reference: per expert (or per rank group) keep the top-C by priority."""
    x = logits.double()
    T, E = x.shape
    k = gate.topk
    top = torch.topk(x, k, dim=1)[1]
    rmap = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    S = torch.softmax(x, dim=1)
    group = 1 if scope == "expert" else E // ep_size
    cap = math.ceil(group * gamma * T * k / E)
    keep = torch.zeros_like(rmap)
    for g0 in range(0, E, group):
        entries = [(t, e) for t in range(T) for e in range(g0, g0 + group) if rmap[t, e]]
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
def expanded_drop_reference(logits, gate, gamma, ep_rank, ep_size):
    x = logits.double()
    T, E = x.shape
    k = gate.topk
    top = torch.topk(x, k, dim=1)[1]
    cand = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    per = E // ep_size
    cand[:, ep_rank * per : (ep_rank + 1) * per] = True
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

"""moebalance.locality: SRP and the expert caches against hand-computed cases, against an
independent direct simulation (one cache size at a time, plain Python) and against the exact
optimum found by exhaustive search; the definitions' own properties (hypothesis); the
bootstrap, the offloading time, the cache-aware choice; bad input; scripts/locality.py on
generated records."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebalance import locality as lc
from moebalance.config import ConfigError
from routing_cases import SETTINGS

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- references


def direct_hits(seq, C, policy, m=None, compulsory=True):
    """Hits of one cache of C slots over ``seq`` (a list of tokens, each a list of expert
    ids), simulated token by token exactly as the definitions read."""
    T = len(seq)
    cache, last, uses, hits = set(), {}, {}, 0
    for t, req in enumerate(seq):
        req = sorted(set(req))
        fresh = 0
        for e in req:
            if e in cache:
                hits += 1
            elif e not in last:
                if not compulsory and len(last) + fresh < C:
                    hits += 1  # first use while a slot is free
                fresh += 1

        def priority(e):
            if policy == "lru":
                p = 0
            elif policy == "lfu":
                p = uses.get(e, 0)
            elif policy == "sch":
                p = sum(e in seq[s] for s in range(t + 1, min(T, t + 1 + m)))
            else:  # belady: sooner next use = higher priority, never again = lowest
                nxt = next((s for s in range(t + 1, T) if e in seq[s]), None)
                p = 0 if nxt is None else T + 1 - nxt
            return (p, last.get(e, -1), -e)

        for e in req:
            if e in cache:
                continue
            if len(cache) >= C:
                victims = [v for v in cache if v not in req]
                if victims:
                    cache.remove(min(victims, key=priority))
                else:  # more experts than slots: keep the token's lowest ids
                    worst = max(cache | {e})
                    if worst == e:
                        continue
                    cache.remove(worst)
            cache.add(e)
        for e in req:
            last[e] = t
            uses[e] = uses.get(e, 0) + 1
    return hits


def optimal_hits(seq, C):
    """The most hits any cache of C slots can get on ``seq`` (every token's experts resident
    after it), by exhaustive search over the cache contents after each token."""
    from itertools import combinations

    @functools.lru_cache(maxsize=None)
    def best(t, cache):
        if t == len(seq):
            return 0
        req = frozenset(seq[t])
        gain = len(req & cache)
        room = C - len(req)
        pool = sorted(cache - req)
        out = 0
        for n in range(min(room, len(pool)) + 1):
            for keep in combinations(pool, n):
                out = max(out, best(t + 1, req | frozenset(keep)))
        return gain + out

    return best(0, frozenset())


def as_ids(seq, width):
    ids = np.full((len(seq), width), -1, dtype=np.int64)
    for t, req in enumerate(seq):
        ids[t, : len(req)] = req
    return ids


#: the stack-pass implementations under test (numba where installed: the test extra has it)
BACKENDS = ["numpy"] + (["numba"] if lc.HAVE_NUMBA else [])


def stack(seq, E, width, policy, m=None, count=None, max_capacity=None, backend="auto"):
    ids = as_ids(seq, width)
    count = np.ones((1, len(seq)), dtype=bool) if count is None else np.asarray(count)[None]
    return lc.stack_hits(ids[None], count, E, policy, m, max_capacity, backend)


def stack_hits_at(seq, E, width, policy, C, m=None, compulsory=True):
    warm, cold = stack(seq, E, width, policy, m)
    return int(warm[0, :C].sum() + (0 if compulsory else cold[0, :C].sum()))


@st.composite
def traces(draw, max_experts=7, max_k=3, max_len=24, exact_k=False):
    """(seq, E, k): tokens of k (or up to k) distinct experts, with runs of repeats."""
    E = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, min(max_k, E)))
    T = draw(st.integers(1, max_len))
    seq, current = [], None
    for _ in range(T):
        if current is None or draw(st.booleans()):
            n = k if exact_k else draw(st.integers(0, k))
            current = sorted(draw(st.permutations(range(E)))[:n])
        seq.append(current)
    return seq, E, k


# ----------------------------------------------------------------------------- SRP


def test_srp_hand_computed_window_counts():
    # m = 2 over {0,1} {0,1} {2,3} {0,1} {2,3}: windows p=0..3; f = 2 for experts 0,1 at p=0,
    # f = 1 for all four experts at p=1,2,3 -> hist f=0: 2, f=1: 12, f=2: 2; activated 16
    ids = np.array([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3]])
    samples = lc.make_samples(ids, num_experts=4)
    hist = lc.window_histogram(ids, samples, 2)
    assert hist.tolist() == [[2, 12, 2]]
    srp, alpha, rho_hat = lc.srp_from_histogram(hist.sum(0), 2)
    # alpha=1: F1 = 2*16 / (2*14 + 16) = 32/44; alpha=2: 2*4 / (2*2 + 16) = 8/20
    assert srp == pytest.approx(100 * 32 / 44) and alpha == 1 and rho_hat == pytest.approx(28 / 16)
    out = lc.analyse(ids, num_experts=4, windows=[2], rhos=[1], resamples=0)
    entry = out["layers"]["0"]["srp"]["2"]
    assert entry["value"] == pytest.approx(72.7273) and entry["windows"] == 4
    assert entry["ci"] == [None, None]


def test_srp_best_threshold_above_one():
    # expert 0 always, expert 1 once in the middle: alpha = 2 drops expert 1's sparse windows
    ids = np.array([[0], [0], [1], [0], [0], [0]])
    samples = lc.make_samples(ids, num_experts=2)
    hist = lc.window_histogram(ids, samples, 3)  # 4 windows x 2 experts
    # expert 0: f = 2, 2, 2, 3; expert 1: f = 1, 1, 1, 0
    assert hist.tolist() == [[1, 3, 3, 1]]
    srp, alpha, rho_hat = lc.srp_from_histogram(hist[0], 3)
    # alpha=1: 2*12/(3*7+12) = 24/33; alpha=2: 2*9/(3*4+12) = 18/24 = 0.75 (best); alpha=3: 6/15
    assert alpha == 2 and srp == pytest.approx(75.0) and rho_hat == pytest.approx(12 / 12)


def test_windows_never_cross_sequences():
    a = np.array([[0, 1]] * 5)
    b = np.array([[2, 3]] * 5)
    joined = lc.analyse([a, b], num_experts=4, windows=[4], rhos=[1], resamples=0)
    assert joined["layers"]["0"]["srp"]["4"]["value"] == 100.0  # each sequence is constant
    glued = lc.analyse(np.concatenate([a, b]), num_experts=4, windows=[4], rhos=[1], resamples=0)
    assert glued["layers"]["0"]["srp"]["4"]["value"] < 100.0
    # the cache starts cold in each sequence: 2 x 2 compulsory misses of 20 activations
    assert joined["layers"]["0"]["hit_rate"]["lru"]["1"]["value"] == 80.0
    # samples cut long sequences the same way
    cut = lc.analyse(np.concatenate([a, a]), num_experts=4, windows=[4], rhos=[1],
                     resamples=0, sample_len=5)
    assert cut["samples"] == 2 and cut["layers"]["0"]["hit_rate"]["lru"]["1"]["value"] == 80.0


def test_srp_of_a_sequence_shorter_than_m_is_absent():
    out = lc.analyse(np.array([[0], [1]]), num_experts=2, windows=[4], rhos=[1], resamples=10)
    assert out["layers"]["0"]["srp"]["4"] == {
        "value": None, "ci": [None, None], "alpha": None, "rho_hat": None, "windows": 0,
    }


@SETTINGS
@given(
    experts=st.lists(st.integers(0, 15), min_size=1, max_size=4, unique=True),
    length=st.integers(1, 60),
    m=st.integers(1, 20),
)
def test_srp_of_a_constant_routing_is_100(experts, length, m):
    ids = np.array([experts] * length)
    srp, alpha, rho_hat = lc.srp_from_histogram(
        lc.window_histogram(ids, lc.make_samples(ids, num_experts=16), m)[0], m
    )
    if length < m:
        assert np.isnan(srp)
    else:
        assert srp == 100.0 and rho_hat == 1.0 and alpha == 1


@SETTINGS
@given(data=traces(max_experts=8, max_len=40), m=st.integers(1, 12), seed=st.integers(0, 99))
def test_srp_is_a_percentage_and_ignores_expert_names(data, m, seed):
    seq, E, k = data
    ids = as_ids(seq, k)
    samples = lc.make_samples(ids, num_experts=E, k=k)
    srp, alpha, rho_hat = lc.srp_from_histogram(lc.window_histogram(ids, samples, m)[0], m)
    if np.isnan(srp):
        return
    assert 0 < srp <= 100 and 1 <= alpha <= m and rho_hat > 0
    names = np.random.default_rng(seed).permutation(E)
    renamed = np.where(ids >= 0, names[np.maximum(ids, 0)], -1)
    again = lc.srp_from_histogram(lc.window_histogram(renamed, samples, m)[0], m)[0]
    assert again == pytest.approx(srp)


# ----------------------------------------------------------------------------- caches


def test_cache_hand_computed_one_expert_per_token():
    # C = 2 over 0 1 0 2 1 1 0 2 0 (see docs/locality.md for the step-by-step cases):
    # LRU hits t2, t5, t8; LFU also t6 (keeps 0, used twice, when 2 arrives at t3);
    # Belady and SCH(m=1) hit t2, t4, t5, t7, t8
    seq = [[0], [1], [0], [2], [1], [1], [0], [2], [0]]
    expected = {("lru", None): 3, ("lfu", None): 4, ("belady", None): 5, ("sch", 1): 5}
    for (policy, m), hits in expected.items():
        assert stack_hits_at(seq, 3, 1, policy, 2, m) == hits, policy
        assert direct_hits(seq, 2, policy, m) == hits, policy
    # SCH counts uses in the window, Belady looks at the next use: 0 1 2 0 2 1 with m = 4
    seq = [[0], [1], [2], [0], [2], [1]]
    assert stack_hits_at(seq, 3, 1, "sch", 2, 4) == 1
    assert stack_hits_at(seq, 3, 1, "belady", 2) == 2 == optimal_hits(seq, 2)
    assert stack_hits_at(seq, 3, 1, "lru", 2) == 1 and stack_hits_at(seq, 3, 1, "lfu", 2) == 1


def test_cache_hand_computed_two_experts_per_token():
    # C = 3: {0,1} misses 2; {1,2}: 1 hits, 2 fills the free slot; {0,1} hits 2;
    # {2,3}: 2 hits, 3 evicts the LRU of 0 and 1 (both last used at t2: the higher id, 1)
    seq = [[0, 1], [1, 2], [0, 1], [2, 3], [0, 3]]
    assert stack_hits_at(seq, 4, 2, "lru", 3) == 1 + 2 + 1 + 2
    # counting first uses as hits while a slot is free: 0, 1 (t0) and 2 (t1); 3 finds none
    assert stack_hits_at(seq, 4, 2, "lru", 3, compulsory=False) == 6 + 3
    warm, cold = stack(seq, 4, 2, "lru")
    assert cold[0].tolist() == [1, 1, 1, 1]  # first uses with 0, 1, 2, 3 experts seen before


def test_sch_is_not_always_better_than_lru():
    """No theorem puts the paper's rule above LRU: SCH counts the uses in the window, not
    when they come. On 0 2 1 2 1 0 0 with C = 2, m = 4, SCH keeps 0 (used twice, at the
    end) and loses 2 and 1, which return at once: 2 hits against LRU's 3."""
    seq = [[0], [2], [1], [2], [1], [0], [0]]
    assert stack_hits_at(seq, 3, 1, "sch", 2, 4) == 2 == direct_hits(seq, 2, "sch", 4)
    assert stack_hits_at(seq, 3, 1, "lru", 2) == 3 == direct_hits(seq, 2, "lru")
    assert stack_hits_at(seq, 3, 1, "belady", 2) == 3 == optimal_hits(seq, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(SETTINGS, max_examples=max(SETTINGS.max_examples, 60))
@given(data=traces(), m=st.integers(1, 6), compulsory=st.booleans(), top=st.integers(0, 6))
def test_stack_pass_equals_direct_simulation_of_every_size(backend, data, m, compulsory, top):
    """One priority-stack pass gives every cache size the hits its own simulation gets, also
    when only the top of the stack (the largest cache asked about) is kept."""
    seq, E, k = data
    kept = min(E, k + top)
    for policy in lc.POLICIES:
        mm = m if policy == "sch" else None
        warm, cold = stack(seq, E, k, policy, mm, backend=backend)
        short, _ = stack(seq, E, k, policy, mm, max_capacity=kept, backend=backend)
        for C in range(k, E + 1):
            want = direct_hits(seq, C, policy, mm, compulsory)
            got = int(warm[0, :C].sum() + (0 if compulsory else cold[0, :C].sum()))
            assert got == want, (policy, C)
            if C <= kept:
                got = int(short[0, :C].sum() + (0 if compulsory else cold[0, :C].sum()))
                assert got == want, (policy, C, kept)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=traces(max_k=2))
def test_tokens_with_more_experts_than_slots(backend, data):
    """An expanded-drop token may use more experts than the cache holds: hits are those
    resident on arrival, and the cache keeps the token's lowest ids."""
    seq, E, k = data
    wide = [sorted(set(t) | {E}) for t in seq]  # one more expert on every token
    for policy in lc.POLICIES:
        mm = 3 if policy == "sch" else None
        warm, cold = stack(wide, E + 1, k + 1, policy, mm, backend=backend)
        for C in range(k + 1, E + 2):
            assert int(warm[0, :C].sum()) == direct_hits(wide, C, policy, mm), (policy, C)


@st.composite
def blocks(draw):
    """(block [B, T, W], count [B, T], E): rows of different lengths (-1 padded), tokens with
    fewer experts than W (none at all included), a counted mask."""
    E = draw(st.integers(1, 10))
    W = draw(st.integers(1, min(E, 4)))
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 20))
    block = np.full((B, T, W), -1, dtype=np.int64)
    for b in range(B):
        for t in range(draw(st.integers(0, T))):
            n = draw(st.integers(0, W))
            block[b, t, :n] = draw(st.permutations(range(E)))[:n]
    count = np.array(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
    return block, count, E


@pytest.mark.skipif(not lc.HAVE_NUMBA, reason="numba not installed")
@settings(SETTINGS, max_examples=max(SETTINGS.max_examples, 80))
@given(data=blocks(), m=st.integers(1, 8), kept=st.integers(1, 10))
def test_compiled_pass_is_the_numpy_pass_on_every_row(data, m, kept):
    """The numba pass (row by row) and the numpy pass (every row at once) return the same
    warm and cold counts, element for element, for every policy and kept top."""
    block, count, E = data
    for policy in lc.POLICIES:
        mm = m if policy == "sch" else None
        a = lc.stack_hits(block, count, E, policy, mm, min(kept, E), backend="numpy")
        b = lc.stack_hits(block, count, E, policy, mm, min(kept, E), backend="numba")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), policy


@pytest.mark.skipif(not lc.HAVE_NUMBA, reason="numba not installed")
def test_analyse_is_the_same_with_either_pass():
    rng = np.random.default_rng(3)
    routing = {l: np.argsort(rng.random((700, 12)), axis=1)[:, :3] for l in range(3)}
    routing[1][::7, 2] = -1  # dropped routes
    offsets = [0, 90, 400, 700]
    kw = dict(num_experts=12, k=3, sample_len=128, resamples=50, windows=(4, 16))
    assert lc.analyse(routing, offsets, backend="numpy", **kw) == lc.analyse(
        routing, offsets, backend="numba", **kw)


def test_a_missing_numba_is_named(monkeypatch):
    monkeypatch.setattr(lc, "HAVE_NUMBA", False)
    with pytest.raises(ConfigError, match="^backend 'numba' needs numba installed"):
        lc.analyse({0: np.zeros((4, 1), dtype=np.int64)}, num_experts=2, backend="numba")
    warm, _ = lc.stack_hits(np.zeros((1, 3, 1), dtype=np.int64), np.ones((1, 3), bool), 2,
                            "lru")  # auto: the numpy pass
    assert warm[0].tolist() == [2, 0]


@SETTINGS
@given(data=traces(max_experts=5, max_len=10))
def test_belady_is_the_optimum_and_bounds_every_policy(data):
    seq, E, k = data
    for C in range(k, E + 1):
        best = optimal_hits(seq, C)
        assert stack_hits_at(seq, E, k, "belady", C) == best
        for policy, m in (("lru", None), ("lfu", None), ("sch", 1), ("sch", 4)):
            assert stack_hits_at(seq, E, k, policy, C, m) <= best


@SETTINGS
@given(data=traces(max_len=40), m=st.integers(1, 8))
def test_hit_rate_never_falls_as_the_cache_grows(data, m):
    """Every policy here evicts by a priority independent of the cache size: a stack algorithm
    (the cache of C slots is inside the cache of C + 1), so hits grow with C; checked on the
    direct simulation, which does not assume it."""
    seq, E, k = data
    for policy in lc.POLICIES:
        mm = m if policy == "sch" else None
        hits = [direct_hits(seq, C, policy, mm) for C in range(k, E + 1)]
        assert hits == sorted(hits), policy


@SETTINGS
@given(data=traces(exact_k=True, max_len=30), m=st.integers(1, 8))
def test_at_rho_one_every_policy_keeps_the_previous_token(data, m):
    """With C = k and exactly k experts per token the cache can only hold the last token's
    experts: every policy hits |R_t & R_{t-1}|."""
    seq, E, k = data
    want = sum(len(set(a) & set(b)) for a, b in zip(seq, seq[1:]))
    for policy in lc.POLICIES:
        assert stack_hits_at(seq, E, k, policy, k, m if policy == "sch" else None) == want


def sticky_trace(rng, T, E, k, switch):
    ids, current = [], rng.choice(E, k, replace=False)
    for _ in range(T):
        if rng.random() < switch:
            current = rng.choice(E, k, replace=False)
        ids.append(sorted(current.tolist()))
    return ids


def test_sch_beats_lru_on_segment_structured_routing():
    """The paper's regime (arXiv 2505.16056): experts stay in use for a while, then the
    segment moves on. There SCH(m=16) should hit at least as often as LRU and no more than
    Belady; an empirical check on fixed seeds, not a theorem (see the counter-example)."""
    rng = np.random.default_rng(7)
    E, k = 16, 2
    seqs = [sticky_trace(rng, 256, E, k, 0.15) for _ in range(8)]
    out = lc.analyse([as_ids(s, k) for s in seqs], num_experts=E, k=k, windows=[16],
                     rhos=[1.5, 2, 3, 4], resamples=0)
    rates = out["layers"]["0"]["hit_rate"]
    for rho in ("1.5", "2", "3", "4"):
        lru, sch, belady = (rates[p][rho]["value"] for p in ("lru", "sch_m16", "belady"))
        assert lru <= sch <= belady
        assert rates["lfu"][rho]["value"] <= rates["belady"][rho]["value"]


def test_counted_tokens_mask():
    seq = [[0], [1], [0], [1], [2], [0]]
    warm_all, _ = stack(seq, 3, 1, "lru")
    count = [False, False, False, True, True, True]  # e.g. only decoded tokens count
    warm, cold = stack(seq, 3, 1, "lru", count=count)
    # C = 2: hits at t2, t3 (counted) and t5? t4 evicts 0 (LRU) -> t5 misses
    assert int(warm_all[0, :2].sum()) == 2 and int(warm[0, :2].sum()) == 1
    assert int(cold[0].sum()) == 1  # expert 2's first use, at t4
    out = lc.analyse(as_ids(seq, 1), num_experts=3, k=1, windows=[2], rhos=[2],
                     count=np.array(count), resamples=0)
    entry = out["layers"]["0"]["hit_rate"]["lru"]["2"]
    assert (entry["hits"], entry["activations"], out["counted_tokens"]) == (1, 3, 3)
    assert entry["misses_per_token"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- analysis


def test_analyse_bootstrap_and_determinism():
    rng = np.random.default_rng(3)
    layers = {l: as_ids(sum((sticky_trace(rng, 64, 8, 2, 0.2) for _ in range(10)), []), 2)
              for l in (1, 3)}
    offsets = np.arange(0, 641, 64)
    a = lc.analyse(layers, offsets, num_experts=8, k=2, windows=[4, 16], rhos=[1, 2],
                   resamples=200, seed=5)
    b = lc.analyse(layers, offsets, num_experts=8, k=2, windows=[4, 16], rhos=[1, 2],
                   resamples=200, seed=5)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = lc.analyse(layers, offsets, num_experts=8, k=2, windows=[4, 16], rhos=[1, 2],
                   resamples=200, seed=6)
    assert sorted(a["layers"]) == ["1", "3"] and a["samples"] == 10
    for layer in ("1", "3"):
        for m in ("4", "16"):
            ea, ec = a["layers"][layer]["srp"][m], c["layers"][layer]["srp"][m]
            assert ea["value"] == ec["value"]  # the estimate does not depend on the seed
            assert ea["ci"][0] <= ea["value"] <= ea["ci"][1]
        hit = a["layers"][layer]["hit_rate"]["belady"]["2"]
        assert hit["ci"][0] <= hit["value"] <= hit["ci"][1]
        assert hit["value"] == pytest.approx(100 * hit["hits"] / hit["activations"], abs=1e-3)
    # the mean over layers averages the layers; its misses sum over them
    mean = a["mean"]["hit_rate"]["lru"]["2"]
    per = [a["layers"][l]["hit_rate"]["lru"]["2"] for l in ("1", "3")]
    assert mean["value"] == pytest.approx(sum(p["value"] for p in per) / 2, abs=1e-3)
    assert mean["misses_per_token"] == pytest.approx(sum(p["misses_per_token"] for p in per))


def test_basic_bootstrap_interval_hand_computed():
    reps = np.arange(1, 102, dtype=float)[:, None]  # quantiles 2.5% -> 3.5, 97.5% -> 98.5
    lo, hi = lc.basic_interval(np.array([50.0]), reps, 0.95)
    assert lo[0] == pytest.approx(100 - 98.5) and hi[0] == pytest.approx(100 - 3.5)
    lo, hi = lc.basic_interval(np.array([99.0]), reps, 0.95)
    assert hi[0] == 100.0  # clipped
    w = lc.bootstrap_weights(7, 50, 0)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all()


# ----------------------------------------------------------------------------- offloading


def test_offload_time_hand_computed():
    # 1.5 loads per token in each of 2 layers, 64 MiB experts over 32 GB/s, 10 us a load
    seconds = lc.offload_seconds_per_token([1.5, 1.5], 64 * 2**20, 32e9, per_load_s=10e-6)
    assert seconds == pytest.approx(3 * (64 * 2**20 / 32e9 + 10e-6))
    assert lc.LINKS["pcie4"].bytes_per_s == pytest.approx(31.5e9, rel=1e-3)
    assert lc.LINKS["pcie5"].bytes_per_s == pytest.approx(63.0e9, rel=1e-3)
    assert "PCI-SIG" in lc.LINKS["pcie5"].source


# ----------------------------------------------------------------------------- cache-aware


def test_cache_aware_choice_prefers_resident_candidates():
    # pools of 3 candidates, k = 1, 1 slot: the plain top-1 alternates 0, 1 and never hits;
    # a flexible token may take its second candidate when that one is resident
    pools = np.array([[0, 1, 2], [1, 0, 2], [0, 1, 2], [1, 0, 2]])
    out = lc.cache_aware_choice(pools, 1, 1, num_experts=3)
    assert out["topk_hit_rate"] == 0.0
    assert out["chosen"][:, 0].tolist() == [0, 0, 0, 0] and out["hit_rate"] == 75.0
    assert out["changed_tokens"] == 2
    rigid = lc.cache_aware_choice(pools, 1, 1, flexible=np.zeros(4, dtype=bool), num_experts=3)
    assert rigid["chosen"][:, 0].tolist() == [0, 1, 0, 1] and rigid["changed_tokens"] == 0
    scores = np.array([[0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    out = lc.cache_aware_choice(pools, 1, 1, scores=scores)
    assert out["score_kept"] == pytest.approx((0.6 + 0.3 + 0.6 + 0.3) / 2.4)


# ----------------------------------------------------------------------------- bad input


ONE = np.array([[0]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(routing=np.array([[0, 9]]), num_experts=8), "routing holds expert ids outside -1..7"),
        (dict(routing=np.array([[1, 1]]), num_experts=8), "routing: token 0 lists an expert twice"),
        (dict(routing=np.array([[0.5]]), num_experts=8), "routing must be an integer array"),
        (dict(routing=np.zeros((0, 2), dtype=int), num_experts=8), "routing holds no token"),
        (dict(routing=ONE, num_experts=0), "num_experts must be an integer >= 1"),
        (dict(routing=np.array([[0], [1]]), num_experts=8, offsets=[0, 3]), "offsets must be"),
        (dict(routing=ONE, num_experts=8, k=9), "k must be an integer >= 1 and <= 8"),
        (dict(routing=ONE, num_experts=8, sample_len=0), "sample_len must be an integer >= 1"),
        (dict(routing=ONE, num_experts=8, rhos=[0.5]), "rhos must be a finite number >= 1.0"),
        (dict(routing=ONE, num_experts=8, rhos=[9]), "rhos: 9.0 * k = 9 slots exceeds"),
        (dict(routing=ONE, num_experts=8, windows=[0]), "windows must be an integer >= 1"),
        (dict(routing=ONE, num_experts=8, windows=[]), "windows must name at least one m"),
        (dict(routing=ONE, num_experts=8, policies=["fifo"]), "policies must be among"),
        (dict(routing=ONE, num_experts=8, resamples=-1), "resamples must be an integer >= 0"),
        (dict(routing=ONE, num_experts=8, confidence=1.0), "confidence must be in (0, 1)"),
        (dict(routing=ONE, num_experts=8, count=[True, False]), "count must be a [1] bool"),
        (dict(routing={0: ONE, 1: np.array([[0], [1]])}, num_experts=8),
         "routing layers hold different token counts"),
        (dict(routing=ONE, num_experts=8, compulsory_misses=1), "compulsory_misses must be"),
    ],
)
def test_bad_input_is_one_config_error_naming_the_parameter(kwargs, message):
    routing = kwargs.pop("routing")
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as err:
        lc.analyse(routing, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_offload_and_cache_aware_input():
    for args, message in [
        (([1.0], 0, 1e9), "expert_bytes must be an integer >= 1"),
        (([1.0], 10, 0.0), "bandwidth must be a finite number > 0.0"),
        (([-1.0], 10, 1e9), "misses_per_token must be a finite number >= 0.0"),
        (([1.0], 10, 1e9, -1.0), "per_load_s must be"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            lc.offload_seconds_per_token(*args)
    with pytest.raises(ConfigError, match="^capacity must be an integer >= 2"):
        lc.cache_aware_choice(np.array([[0, 1, 2]]), 2, 1)
    with pytest.raises(ConfigError, match="^k must be an integer >= 1 and <= 3"):
        lc.cache_aware_choice(np.array([[0, 1, 2]]), 4, 4, num_experts=4)
    with pytest.raises(ConfigError, match="^policy must be one of"):
        lc.stack_hits(np.zeros((1, 2, 1), dtype=np.int64), np.ones((1, 2), bool), 2, "mru")
    with pytest.raises(ConfigError, match="^backend must be one of"):
        lc.stack_hits(np.zeros((1, 2, 1), dtype=np.int64), np.ones((1, 2), bool), 2, "lru",
                      backend="cuda")


# ----------------------------------------------------------------------------- the script


def _write_records(tmp_path: Path) -> list[Path]:
    from moebalance.routing_record import FORMAT, VERSION, RoutingRecord

    rng = np.random.default_rng(0)
    offsets = np.arange(0, 24 * 40 + 1, 40)
    phase = np.tile(np.r_[np.zeros(30), np.ones(10)], 24).astype(np.int8)
    paths = []
    for router, switch in (("topk", 0.1), ("laser", 0.4)):
        layers = {l: as_ids(sum((sticky_trace(rng, 40, 8, 2, switch) for _ in range(24)), []), 2)
                  for l in (0, 2)}
        header = {
            "format": FORMAT, "version": VERSION, "model": "tiny-moe", "num_experts": 8,
            "topk": 2, "layers": [0, 2], "router": router, "router_params": {},
            "framework": "megatron", "ep": 2, "world_size": 2, "prompts": {"seed": 0},
            "phases": ["prefill", "decode"], "domains": ["code", "prose"],
            "expert_bytes": 1_000_000,
        }
        path = tmp_path / f"{router}.safetensors"
        RoutingRecord(header, layers, offsets, phase, np.arange(24, dtype=np.int16) % 2,
                      np.zeros(24, dtype=np.int16)).save(path)
        paths.append(path)
    return paths


def _script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "locality.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=240)


def test_script_compares_records_and_writes_json_markdown_and_plots(tmp_path):
    paths = _write_records(tmp_path)
    out = tmp_path / "loc.json"
    done = _script(*paths, "--out", out, "--by-domain", "--resamples", "100",
                   "--windows", "4", "16", "--bandwidth", "pcie4", "1e9")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["topk", "laser"]
    topk, laser = report["results"]["topk"], report["results"]["laser"]
    # the routing that switches experts more often has less locality
    assert topk["all"]["mean"]["srp"]["16"]["value"] > laser["all"]["mean"]["srp"]["16"]["value"]
    assert (topk["all"]["mean"]["hit_rate"]["lru"]["2"]["value"]
            > laser["all"]["mean"]["hit_rate"]["lru"]["2"]["value"])
    assert set(topk["domains"]) == {"code", "prose"}
    # the figures are those of the module on the same tokens
    from moebalance.routing_record import RoutingRecord

    rec = RoutingRecord.load(paths[0])
    direct = lc.analyse(rec.layers, rec.offsets, num_experts=8, k=2, windows=[4, 16],
                        resamples=100)
    assert topk["all"]["mean"] == direct["mean"]
    # offloading: decoded tokens only, one row per policy, cache size and link
    rows = report["offload"]["topk"]
    assert {r["per"] for r in rows} == {"decoded token"}
    row = next(r for r in rows
               if (r["policy"], r["rho"], r["link"]) == ("lru", "2", "1 GB/s"))
    decode = topk["decode_only"]["mean"]["hit_rate"]["lru"]["2"]
    assert row["loads_per_token"] == decode["misses_per_token"]
    seconds = decode["misses_per_token"] * 1e6 / 1e9
    assert row["ms_per_token"] == pytest.approx(seconds * 1e3, rel=1e-4)
    assert decode["activations"] == 24 * 10 * 2 * 2  # decoded tokens x k x layers
    md = out.with_suffix(".md").read_text()
    assert "## topk" in md and "## laser" in md and "Simulated offloading time" in md
    for png in ("loc_hit_rate.png", "loc_srp.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # outputs are not overwritten by accident
    again = _script(*paths, "--out", out)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def _script_module():
    import importlib.util

    path = ROOT / "scripts" / "locality.py"
    spec = importlib.util.spec_from_file_location("locality_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_bad_input_exits_2_with_one_line(tmp_path, capsys):
    paths = _write_records(tmp_path)
    from moebalance.routing_record import RoutingRecord

    other = RoutingRecord.load(paths[1])
    other.header["prompts"] = {"seed": 1}
    other.save(tmp_path / "other.safetensors")
    script = _script_module()
    for args, message in [
        ([paths[0], tmp_path / "other.safetensors"], "differ in header field 'prompts'"),
        ([tmp_path / "missing.safetensors"], "no such file"),
        ([paths[0], "--rhos", "0.5"], "--rhos must be >= 1"),
        ([paths[0], "--windows", "0"], "expected a positive integer"),
        ([paths[0], "--bandwidth", "pcie9"], "expected a number"),
        ([paths[0], "--phases", "eval"], "no token of phases ['eval']"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            script.main([*map(str, args), "--out", str(tmp_path / "x.json"), "--no-plots"])
        assert exit_.value.code == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)
    assert not (tmp_path / "x.json").exists()

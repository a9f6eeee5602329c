"""Replica choice (``moebalance.replicas``): logical routing [T, E] -> physical slots [T, P].

Every routed (token, expert) pair lands on exactly one slot of its expert with its weight
unchanged; round-robin balances each expert's replicas within one token; least-loaded reaches
the water-filling optimum; local-first stays local unless this rank is the most loaded; one
replica per expert in contiguous slots is the identity; no host synchronisation.
"""

from __future__ import annotations

import heapq
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from routing_cases import SETTINGS, logits_for
from test_policies import _HostSyncRecorder

from moebalance import ConfigError, GateConfig, RoutingContext
from moebalance.policies import expanded_drop, topk
from moebalance.replicas import (
    REPLICA_POLICIES,
    ReplicaParams,
    check_layout,
    choose_replicas,
    layout_for_rank,
    logical_loads,
    logical_routing,
    replica_maps,
    replica_quotas,
)
from moebalance.routing import Routing


# ---------------------------------------------------------------- inputs
def random_layout(E: int, ep: int, extra: int, seed: int, contiguous_ranks: bool = True):
    """(phy2log, log2phy, logcnt, slot_rank): every expert once plus ``extra`` replicas of
    random experts, shuffled over P slots (a multiple of ep), slots on ranks in blocks."""
    g = torch.Generator().manual_seed(seed)
    P = -(-(E + extra) // ep) * ep
    phy2log = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)])
    phy2log = phy2log[torch.randperm(P, generator=g)]
    if contiguous_ranks:
        slot_rank = torch.arange(P) // (P // ep)
    else:
        slot_rank = (torch.arange(P) % ep)[torch.randperm(P, generator=g)]
    log2phy, logcnt = replica_maps(phy2log, E)
    check_layout(log2phy, logcnt, slot_rank, ep)
    return phy2log, log2phy, logcnt, slot_rank


def random_routing(T: int, E: int, seed: int, density: float = 0.4, dtype=torch.float32) -> Routing:
    """A logical Routing [T, E]: a random map (any number of experts per token), random
    weights on it, zero off it; capacity and num_dropped set so that carrying them shows."""
    g = torch.Generator().manual_seed(seed)
    rmap = torch.rand(T, E, generator=g) < density
    probs = torch.where(rmap, torch.rand(T, E, generator=g), 0.0).to(dtype)
    return Routing(probs, rmap, capacity=7, num_dropped=torch.tensor(3))


def slot_loads(P: int, seed: int, high: int = 20) -> torch.Tensor:
    return torch.randint(0, high, (P,), generator=torch.Generator().manual_seed(seed + 1))


def slot_hits(phys: Routing, phy2log: torch.Tensor, E: int) -> torch.Tensor:
    """[T, E] int: slots each (token, expert) pair was sent to."""
    hits = torch.zeros(phys.routing_map.shape[0], E, dtype=torch.int64)
    return hits.index_add_(1, phy2log, phys.routing_map.long())


LAYOUTS = dict(
    E=st.integers(1, 8),
    ep=st.integers(1, 4),
    extra=st.integers(0, 10),
    T=st.integers(0, 60),
    seed=st.integers(0, 10_000),
)


# ---------------------------------------------------------------- every policy
@given(
    **LAYOUTS,
    policy=st.sampled_from(REPLICA_POLICIES),
    offset=st.integers(0, 1000),
    loaded=st.booleans(),
    mixed_ranks=st.booleans(),
)
@SETTINGS
def test_every_pair_lands_on_one_slot_of_its_expert(E, ep, extra, T, seed, policy, offset, loaded, mixed_ranks):
    """The logical projection of the physical routing is the logical routing, bit for bit:
    each routed pair on exactly one slot, every slot only its own expert's tokens, the weight
    unchanged; capacity and num_dropped carried."""
    phy2log, log2phy, logcnt, slot_rank = random_layout(E, ep, extra, seed, not mixed_ranks)
    P = phy2log.numel()
    logical = random_routing(T, E, seed)
    ctx = RoutingContext(ep_rank=seed % ep, ep_size=ep)
    load = slot_loads(P, seed) if loaded else None
    phys = choose_replicas(
        logical, log2phy, logcnt, slot_rank, ReplicaParams(policy), ctx, slot_load=load, token_offset=offset
    )
    assert phys.probs.shape == phys.routing_map.shape == (T, P)
    assert torch.equal(slot_hits(phys, phy2log, E), logical.routing_map.long())  # once each
    # a slot holds only tokens routed to its own expert (with their weights)
    assert not (phys.routing_map & ~logical.routing_map[:, phy2log]).any()
    assert torch.equal(phys.probs, torch.where(phys.routing_map, logical.probs[:, phy2log], 0.0))
    back = logical_routing(phys, phy2log, E)
    assert torch.equal(back.routing_map, logical.routing_map)
    assert torch.equal(back.probs.view(torch.int32), logical.probs.view(torch.int32))
    assert torch.equal(logical_loads(phys, phy2log, E), logical.expert_load())
    assert phys.capacity == 7 and int(phys.num_dropped) == 3


@pytest.mark.parametrize("policy", REPLICA_POLICIES)
def test_one_replica_per_expert_in_contiguous_slots_is_the_identity(policy):
    """P = E, slot e = expert e: every policy returns the logical routing unchanged (bits)."""
    E, ep, T = 16, 4, 300
    gate = GateConfig(num_experts=E, topk=4)
    log2phy, logcnt = torch.arange(E).unsqueeze(1), torch.ones(E, dtype=torch.int64)
    slot_rank = torch.arange(E) // (E // ep)
    for logical in (
        topk(logits_for(T, E, 1, 2.0).bfloat16(), gate),
        expanded_drop(logits_for(T, E, 2, 2.0), gate, ctx=RoutingContext(ep_rank=2, ep_size=ep)),
        random_routing(0, E, 0),
    ):
        for load, offset in ((None, 0), (slot_loads(E, 5, 1000), 13)):
            phys = choose_replicas(
                logical, log2phy, logcnt, slot_rank, ReplicaParams(policy),
                RoutingContext(ep_rank=1, ep_size=ep), slot_load=load, token_offset=offset,
            )
            assert torch.equal(phys.routing_map, logical.routing_map)
            assert phys.probs.dtype == logical.probs.dtype
            assert torch.equal(bits(phys.probs), bits(logical.probs))


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


# ---------------------------------------------------------------- round-robin
@given(**LAYOUTS, offset=st.integers(0, 1000), density=st.floats(0.05, 1.0))
@SETTINGS
def test_round_robin_balances_each_experts_replicas_within_one(E, ep, extra, T, seed, offset, density):
    """Per expert, replica counts differ by at most one, the extra tokens going to the
    replicas from number ``offset mod logcnt`` on (vLLM's turn by token position)."""
    phy2log, log2phy, logcnt, slot_rank = random_layout(E, ep, extra, seed)
    logical = random_routing(T, E, seed, density)
    phys = choose_replicas(logical, log2phy, logcnt, slot_rank, token_offset=offset)
    load = phys.expert_load()
    for e in range(E):
        cnt, n = int(logcnt[e]), int(logical.expert_load()[e])
        got = load[log2phy[e, :cnt]]
        want = torch.tensor([n // cnt + ((j - offset) % cnt < n % cnt) for j in range(cnt)])
        assert torch.equal(got, want), (e, got, want)


def test_round_robin_takes_turns_by_token_position():
    """One expert, three replicas: its tokens take them in turn in position order, starting at
    replica offset mod 3 (tokens not routed to the expert do not take a turn)."""
    log2phy, logcnt = torch.tensor([[2, 0, 1]]), torch.tensor([3])
    rmap = torch.tensor([[True], [False], [True], [True], [True]])
    logical = Routing(rmap.float(), rmap)
    phys = choose_replicas(logical, log2phy, logcnt, torch.zeros(3, dtype=torch.int64), token_offset=4)
    chosen = phys.routing_map.float().argmax(1)
    assert chosen[rmap[:, 0]].tolist() == [0, 1, 2, 0]  # replicas 1, 2, 0, 1 = slots 0, 1, 2, 0


# ---------------------------------------------------------------- least-loaded
def greedy_loads(need: int, base: list[int]) -> list[int]:
    """Reference: one token at a time to the least-loaded replica (optimal for unit tokens)."""
    heap = [(float(b), j) for j, b in enumerate(base)]
    heapq.heapify(heap)
    for _ in range(need):
        b, j = heapq.heappop(heap)
        heapq.heappush(heap, (b + 1.0, j))
    return sorted(int(b) for b, _ in heap)


@given(**LAYOUTS, offset=st.integers(0, 100), high=st.sampled_from([1, 5, 40]))
@SETTINGS
def test_least_loaded_reaches_the_water_filling_optimum(E, ep, extra, T, seed, offset, high):
    """Per expert the final replica loads (given loads + tokens) are those of the optimal
    one-by-one greedy, so the largest slot load is the least possible; float64 reference."""
    phy2log, log2phy, logcnt, slot_rank = random_layout(E, ep, extra, seed)
    P = phy2log.numel()
    logical = random_routing(T, E, seed)
    base = slot_loads(P, seed, high)
    phys = choose_replicas(
        logical, log2phy, logcnt, slot_rank, ReplicaParams("least_loaded"),
        slot_load=base.double(), token_offset=offset,
    )
    final = base + phys.expert_load()
    for e in range(E):
        slots = log2phy[e, : int(logcnt[e])]
        want = greedy_loads(int(logical.expert_load()[e]), base[slots].tolist())
        assert sorted(final[slots].tolist()) == want


@given(
    need=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    base=st.lists(st.integers(0, 6), min_size=12, max_size=12),
    cnt=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    offset=st.integers(0, 5),
)
@SETTINGS
def test_replica_quotas_match_brute_force(need, base, cnt, offset):
    """Every split of each expert's tokens over its replicas tried: the quotas sum to the
    need and reach the least possible maximum load."""
    E, R = len(need), 3
    cnt = cnt[:E]
    valid = torch.arange(R) < torch.tensor(cnt).unsqueeze(1)
    b = torch.tensor(base[: E * R]).view(E, R)
    quota = replica_quotas(torch.tensor(need), b, valid, offset)
    assert (quota >= 0).all() and not (quota * ~valid).any()
    assert quota.sum(1).tolist() == need
    for e in range(E):
        c = cnt[e]
        best = min(
            max(b[e, j].item() + split[j] for j in range(c))
            for split in itertools.product(range(need[e] + 1), repeat=c)
            if sum(split) == need[e]
        )
        assert max((b[e, :c] + quota[e, :c]).tolist()) == best


# ---------------------------------------------------------------- local-first
@given(**LAYOUTS, hot=st.integers(0, 3), loaded=st.booleans(), mixed_ranks=st.booleans())
@SETTINGS
def test_local_first_stays_local_unless_this_rank_is_the_most_loaded(E, ep, extra, T, seed, hot, loaded, mixed_ranks):
    """A pair stays on this rank when its expert has a replica here and this rank is not the
    most loaded; a replica on a most-loaded rank is chosen only when the expert has none
    elsewhere; otherwise the others share the tokens round-robin."""
    phy2log, log2phy, logcnt, slot_rank = random_layout(E, ep, extra, seed, not mixed_ranks)
    P = phy2log.numel()
    rank = seed % ep
    load = torch.zeros(P, dtype=torch.int64)
    if loaded:  # one rank (perhaps this one) clearly the most loaded
        load = slot_loads(P, seed, 5) + 100 * (slot_rank == hot % ep)
    logical = random_routing(T, E, seed, 0.5)
    phys = choose_replicas(
        logical, log2phy, logcnt, slot_rank, ReplicaParams("local_first"),
        RoutingContext(ep_rank=rank, ep_size=ep), slot_load=load,
    )
    rank_load = torch.zeros(ep, dtype=torch.int64).index_add_(0, slot_rank, load)
    is_hot = (rank_load == rank_load.max()) & (rank_load.max() > rank_load.min())
    for e in range(E):
        slots = log2phy[e, : int(logcnt[e])]
        ranks = slot_rank[slots]
        used = phys.routing_map[:, slots].any(0)
        has_local = bool((ranks == rank).any())
        if has_local and not is_hot[rank]:
            assert (ranks[used] == rank).all()
        elif (~is_hot[ranks]).any():
            assert not is_hot[ranks[used]].any()
            others = slots[~is_hot[ranks]]
            n = phys.routing_map[:, others].sum(0)
            assert int(n.max() - n.min()) <= 1  # round-robin among the others
    assert torch.equal(slot_hits(phys, phy2log, E), logical.routing_map.long())


def test_local_first_prefers_the_local_replica_and_leaves_a_hot_rank():
    """Expert 0 has slot 0 on rank 0 and slot 1 on rank 1; expert 1 only slot 2 on rank 1."""
    log2phy, logcnt = torch.tensor([[0, 1], [2, -1]]), torch.tensor([2, 1])
    slot_rank = torch.tensor([0, 1, 1])
    rmap = torch.ones(6, 2, dtype=torch.bool)
    logical = Routing(rmap.float() / 2, rmap)
    local = ReplicaParams("local_first")
    rank0, rank1 = RoutingContext(ep_rank=0, ep_size=2), RoutingContext(ep_rank=1, ep_size=2)
    cool = choose_replicas(logical, log2phy, logcnt, slot_rank, local, rank0)
    assert cool.expert_load().tolist() == [6, 0, 6]  # expert 0 all on the local slot
    hot = choose_replicas(logical, log2phy, logcnt, slot_rank, local, rank0,
                          slot_load=torch.tensor([9, 0, 0]))
    assert hot.expert_load().tolist() == [0, 6, 6]  # rank 0 most loaded: expert 0 leaves it
    remote = choose_replicas(logical, log2phy, logcnt, slot_rank, local, rank1,
                             slot_load=torch.tensor([0, 9, 0]))
    # rank 1 most loaded: expert 0 leaves it; expert 1 has no replica elsewhere and stays
    assert remote.expert_load().tolist() == [6, 0, 6]


# ---------------------------------------------------------------- maps, errors, host syncs
def test_replica_maps_and_layout_for_rank():
    phy2log = torch.tensor([0, 1, 2, 3, 0, 0, 1, 4, 5, 2])
    log2phy, logcnt = replica_maps(phy2log, 6)
    assert log2phy.tolist() == [[0, 4, 5], [1, 6, -1], [2, 9, -1], [3, -1, -1], [7, -1, -1], [8, -1, -1]]
    assert logcnt.tolist() == [3, 2, 2, 1, 1, 1]
    slot_rank = torch.arange(10) // 5
    local, group = layout_for_rank(log2phy, logcnt, slot_rank, 1)
    assert local.tolist() == [True, True, True, False, True, True]
    assert group.tolist() == [0, 0, 0, 0, 1, 1]
    ctx = RoutingContext(ep_rank=1, ep_size=2, local_experts=local, expert_group=group)
    ctx.validate(GateConfig(num_experts=6, topk=2))


# 4 experts on 6 slots over 2 ranks: experts 0 and 1 replicated
E4 = dict(log2phy=torch.tensor([[0, 4], [1, 5], [2, -1], [3, -1]]), logcnt=torch.tensor([2, 2, 1, 1]),
          slot_rank=torch.tensor([0, 0, 0, 1, 1, 1]))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(log2phy=E4["log2phy"].int()), "log2phy must be a 2-D int64"),
        (dict(logcnt=torch.tensor([2, 2, 1])), r"logcnt must have shape \[num_experts=4\]"),
        (dict(slot_rank=torch.tensor([0, 1, 1])), "slot_rank must cover num_slots >= num_experts=4"),
        (dict(logcnt=torch.tensor([2, 2, 0, 1])), r"logcnt must hold replica counts in \[1, R=2\]"),
        (dict(logcnt=torch.tensor([1, 1, 1, 1])), r"rows \[0, 1\] do not"),
        (dict(log2phy=torch.tensor([[0, 4], [1, 5], [2, -1], [0, -1]])), r"slots \[0, 3\] do not"),
        (dict(log2phy=torch.tensor([[0, 9], [1, 5], [2, -1], [3, -1]])), r"slots in \[0, num_slots=6\)"),
        (dict(slot_rank=torch.tensor([0, 0, 0, 1, 2, 1])), r"EP ranks in \[0, ep_size=2\)"),
    ],
)
def test_bad_layouts_are_one_line_config_errors(change, match):
    layout = {**E4, **change}
    with pytest.raises(ConfigError, match=match) as err:
        check_layout(layout["log2phy"], layout["logcnt"], layout["slot_rank"], 2)
    assert "\n" not in str(err.value)


def test_bad_parameters_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="policy must be one of .*'local_first'.*got 'random'"):
        ReplicaParams("random")
    logical = random_routing(4, 4, 0)
    cases = [
        (dict(routing=random_routing(4, 5, 0)), "routing must be over the 4 logical experts"),
        (dict(slot_load=torch.zeros(5)), r"slot_load must be a real tensor of shape \[num_slots=6\]"),
        (dict(token_offset=1.5), "token_offset must be an integer"),
        (dict(params="round_robin"), "params must be ReplicaParams or None, got str"),
    ]
    for change, match in cases:
        args = dict(routing=logical, **E4)
        args.update(change)
        with pytest.raises(ConfigError, match=match) as err:
            choose_replicas(**args)
        assert "\n" not in str(err.value)
    check_layout(E4["log2phy"].to("meta"), E4["logcnt"].to("meta"), E4["slot_rank"].to("meta"), 2)


@pytest.mark.parametrize("policy", REPLICA_POLICIES)
def test_replica_choice_never_synchronises_with_the_host(policy):
    phy2log, log2phy, logcnt, slot_rank = random_layout(32, 4, 16, 3)
    logical = random_routing(700, 32, 3)
    ctx = RoutingContext(ep_rank=1, ep_size=4)
    load = slot_loads(phy2log.numel(), 3)
    with torch.no_grad(), _HostSyncRecorder() as recorder:
        choose_replicas(logical, log2phy, logcnt, slot_rank, ReplicaParams(policy), ctx,
                        slot_load=load, token_offset=torch.tensor(5))
        layout_for_rank(log2phy, logcnt, slot_rank, 1)
        logical_routing(logical, torch.arange(32), 32)
    assert recorder.seen == [], f"{policy} synchronised with the host via {recorder.seen}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", REPLICA_POLICIES)
def test_cuda_matches_cpu(policy):
    phy2log, log2phy, logcnt, slot_rank = random_layout(64, 8, 32, 4, False)
    logical = random_routing(2048, 64, 4)
    load = slot_loads(phy2log.numel(), 4, 50)
    ctx = RoutingContext(ep_rank=3, ep_size=8)
    args = (ReplicaParams(policy), ctx)
    cpu = choose_replicas(logical, log2phy, logcnt, slot_rank, *args, slot_load=load, token_offset=9)
    on = lambda x: x.cuda()  # noqa: E731
    gpu_logical = Routing(on(logical.probs), on(logical.routing_map), logical.capacity, on(logical.num_dropped))
    gpu = choose_replicas(gpu_logical, on(log2phy), on(logcnt), on(slot_rank), *args,
                          slot_load=on(load), token_offset=9)
    assert torch.equal(gpu.routing_map.cpu(), cpu.routing_map)
    assert torch.equal(gpu.probs.cpu(), cpu.probs)

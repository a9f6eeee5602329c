"""moebalance.rebalance: aligned re-plans move only the slots whose expert changes, and the
moves (local copies, send / recv pairs) put every expert's weights where the new plan wants
them, at world 1 and 2 (gloo)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mp_utils import init_gloo, run_workers
from moebalance.placement import plan_placement
from moebalance.rebalance import align_placement, move_expert_weights, slot_moves


def _plans(seed: int, ranks: int = 2, experts: int = 8, extra: int = 4):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(experts, generator=gen, dtype=torch.float64) ** 3 * 100 + 1
    b = torch.rand(experts, generator=gen, dtype=torch.float64) ** 3 * 100 + 1
    return plan_placement(a, experts + extra, ranks), plan_placement(b, experts + extra, ranks)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 2, 4]))
def test_aligned_plan_keeps_each_rank_s_experts_and_moves_only_changes(seed, ranks):
    old, new = _plans(seed, ranks)
    aligned = align_placement(old, new)
    for r in range(ranks):  # the same replicas per rank as the new plan
        want = sorted(new.phy2log[new.slot_rank == r].tolist())
        assert sorted(aligned.phy2log[aligned.slot_rank == r].tolist()) == want
    moves = slot_moves(old, aligned)
    changed = {s for s in range(old.num_slots) if int(old.phy2log[s]) != int(aligned.phy2log[s])}
    assert {m.slot for m in moves} == changed
    for m in moves:  # the source holds the destination's new expert under the old plan
        assert int(old.phy2log[m.source]) == int(aligned.phy2log[m.slot])
        assert m.src_rank == int(old.slot_rank[m.source]) and m.dst_rank == int(aligned.slot_rank[m.slot])
    # never more moves than slots whose expert multiset changed on their rank
    for r in range(ranks):
        kept = sorted(old.phy2log[old.slot_rank == r].tolist())
        fresh = sorted(aligned.phy2log[aligned.slot_rank == r].tolist())
        lost = sum(max(0, kept.count(e) - fresh.count(e)) for e in set(kept))
        assert sum(1 for m in moves if m.dst_rank == r) == lost


def _move_worker(rank, world, seed):
    init_gloo()
    old, new = _plans(seed, world)
    new = align_placement(old, new)
    per_rank = old.slots_per_rank

    def expert(e):  # expert e's weights: distinct values per expert
        module = torch.nn.Linear(3, 2, bias=False)
        module.weight.data.fill_(float(e))
        return module

    local = {s: expert(int(old.phy2log[s])) for s in range(rank * per_rank, (rank + 1) * per_rank)}
    cost = move_expert_weights(local, slot_moves(old, new), rank)
    got = {s: float(m.weight[0, 0]) for s, m in local.items()}
    want = {s: float(new.phy2log[s]) for s in local}
    torch.distributed.destroy_process_group()
    return got == want, cost


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_moves_put_every_expert_where_the_new_plan_wants_it(world):
    results = run_workers(_move_worker, world, 3, timeout_s=120)
    assert all(ok for ok, _ in results)
    sent = sum(c["sent_bytes"] for _, c in results)
    assert sent == sum(c["received_bytes"] for _, c in results)

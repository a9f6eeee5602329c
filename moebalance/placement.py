"""Replica placement: how many physical slots each logical expert gets, and which EP rank hosts
each slot, planned once per layer from calibration loads.

Terms (shapes in brackets):
- ``load [E]``: tokens routed to each logical expert over a calibration set (any non-negative
  numbers; only their ratios matter).
- ``P`` physical slots over ``EP`` ranks, ``S = P / EP`` slots per rank; the slots of rank ``r``
  are the contiguous block ``r * S .. r * S + S - 1`` (Megatron and DeepSpeed place local experts
  that way).
- A replica of expert ``e`` is assumed to receive ``load[e] / logcnt[e]`` (the replica choice
  splits an expert's tokens evenly); a rank's load is the sum over its slots. The planners
  minimise the peak rank load.

Planners:
- ``eplb_placement``: DeepSeek EPLB's two greedy steps, reimplemented from their description
  (``replicate_greedy`` then ``pack_greedy``).
- ``plan_placement(method="search")``: replica counts and packing optimised together (local
  search over replica-count moves, each scored after a greedy packing improved by slot swaps); it
  never returns a plan with a higher peak than ``eplb_placement``'s.
- ``plan_placement(method="exact")`` / ``solve_exact``: the optimum by a MILP
  (``scipy.optimize.milp``), for small sizes.
- ``lower_bound``: a bound below every plan's peak, to report beside them.

Also here: int8 memory accounting (``expert_bytes_per_rank``, ``choose_int8``) and the plan file
(``save_plan`` / ``load_plan``, JSON). Everything runs on CPU tensors, once per plan: the loops
are over experts, slots and ranks, never over tokens.
"""

from __future__ import annotations

import datetime
import heapq
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .files import write_text_atomic

__all__ = [
    "PLAN_FORMAT",
    "check_plans_fit",
    "METHODS",
    "Placement",
    "placement_from_ranks",
    "rank_loads",
    "peak_over_mean",
    "lower_bound",
    "replicate_greedy",
    "pack_greedy",
    "eplb_placement",
    "plan_placement",
    "solve_exact",
    "expert_bytes_per_rank",
    "choose_int8",
    "save_plan",
    "load_plan",
]

PLAN_FORMAT = "moebalance-placement/1"
METHODS = ("eplb", "search", "exact")

# relative tolerance when comparing peaks: loads are sums of floats, and two packings with the
# same multiset of slot weights per rank must compare equal whatever the summation order
_REL_TOL = 1e-9
# the local search stops after this many accepted replica-count moves (each strictly improves
# (peak, ranks at peak, sum of squares)); a cap on iterations, not on time, keeps plans
# deterministic
_MAX_MOVES = 256
# candidate experts per side of a replica-count move, besides those on the peak rank(s)
_MOVE_CANDIDATES = 6
# most replicas one move of the local search transfers between two experts
_MAX_STEP = 3
# caps tried as starting points of the local search (``_starting_counts``)
_STARTS = 16
# the exact solver refuses problems with more integer variables than this (it would not finish)
MAX_EXACT_VARIABLES = 20000


@dataclass(frozen=True)
class Placement:
    """One layer's plan.

    - ``phy2log [P]`` int64: the logical expert each physical slot holds.
    - ``log2phy [E, R]`` int64: the physical slots of each expert's replicas in increasing
      order, padded with -1 (``R = max(logcnt)``).
    - ``logcnt [E]`` int64: replicas per logical expert (>= 1).
    - ``slot_rank [P]`` int64: the EP rank hosting each slot, ``s // (P / num_ranks)``.
    - ``num_ranks``: EP ranks.

    Validated on construction: ConfigError (one line) naming what is wrong.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    slot_rank: torch.Tensor
    num_ranks: int

    def __post_init__(self) -> None:
        check_placement(self)

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.numel())

    @property
    def num_experts(self) -> int:
        return int(self.logcnt.numel())

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks


def _fail(message: str) -> None:
    raise ConfigError(message.replace("\n", " "))


def _check_int_tensor(name: str, value: Any, dim: int) -> None:
    if not isinstance(value, torch.Tensor):
        _fail(f"placement: {name} must be a torch tensor, got {type(value).__name__}")
    if value.dim() != dim:
        _fail(f"placement: {name} must have {dim} dimension(s), got shape {list(value.shape)}")
    if value.dtype != torch.int64:
        _fail(f"placement: {name} must be int64, got {value.dtype}")


def check_placement(p: Placement) -> None:
    """ConfigError (one line) unless ``p`` is a valid plan: P divisible by num_ranks, every index
    in range, every logical expert with >= 1 replica, slot_rank contiguous with equal slots per
    rank, and phy2log / log2phy / logcnt describing the same slots."""
    if type(p.num_ranks) is not int or p.num_ranks < 1:
        _fail(f"placement: num_ranks must be a positive int, got {p.num_ranks!r}")
    _check_int_tensor("phy2log", p.phy2log, 1)
    _check_int_tensor("log2phy", p.log2phy, 2)
    _check_int_tensor("logcnt", p.logcnt, 1)
    _check_int_tensor("slot_rank", p.slot_rank, 1)
    num_slots, num_experts = p.phy2log.numel(), p.logcnt.numel()
    if num_experts < 1:
        _fail("placement: logcnt is empty (no logical experts)")
    if num_slots % p.num_ranks:
        _fail(f"placement: {num_slots} slots do not divide over {p.num_ranks} ranks")
    if num_slots < num_experts:
        _fail(f"placement: {num_slots} slots cannot hold {num_experts} logical experts")
    bad = (p.phy2log < 0) | (p.phy2log >= num_experts)
    if bad.any():
        slot = int(bad.nonzero()[0])
        _fail(f"placement: slot {slot} holds unknown logical expert {int(p.phy2log[slot])} "
              f"(experts are 0..{num_experts - 1})")
    if (p.logcnt < 1).any():
        expert = int((p.logcnt < 1).nonzero()[0])
        _fail(f"placement: logical expert {expert} has no replica (logcnt {int(p.logcnt[expert])})")
    counted = torch.bincount(p.phy2log, minlength=num_experts)
    if not torch.equal(counted, p.logcnt):
        expert = int((counted != p.logcnt).nonzero()[0])
        _fail(f"placement: logcnt[{expert}] = {int(p.logcnt[expert])} but phy2log has "
              f"{int(counted[expert])} slot(s) of expert {expert}")
    expected_rank = torch.arange(num_slots) // (num_slots // p.num_ranks)
    if p.slot_rank.numel() != num_slots or not torch.equal(p.slot_rank, expected_rank):
        _fail(f"placement: slot_rank must give rank s // {num_slots // p.num_ranks} to slot s "
              f"(equal, contiguous slots per rank over {p.num_ranks} ranks)")
    width = int(p.logcnt.max())
    if list(p.log2phy.shape) != [num_experts, width]:
        _fail(f"placement: log2phy must have shape [{num_experts}, {width}] (experts, max "
              f"replicas), got {list(p.log2phy.shape)}")
    expected = _log2phy(p.phy2log, num_experts)
    if not torch.equal(p.log2phy, expected):
        expert = int((p.log2phy != expected).any(dim=1).nonzero()[0])
        _fail(f"placement: log2phy[{expert}] = {p.log2phy[expert].tolist()} does not list the "
              f"slots holding expert {expert} in phy2log ({expected[expert].tolist()}, -1 padded)")


def _log2phy(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """phy2log [P] -> log2phy [E, max replicas]: each expert's slots ascending, -1 padded."""
    counts = torch.bincount(phy2log, minlength=num_experts)
    width = max(int(counts.max()), 1)
    order = torch.sort(phy2log, stable=True).indices  # slots grouped by expert, ascending within
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(phy2log.numel()) - starts[phy2log[order]]
    out = torch.full((num_experts, width), -1, dtype=torch.int64)
    out[phy2log[order], column] = order
    return out


def placement_from_ranks(
    expert_of_item: Sequence[int] | torch.Tensor,
    rank_of_item: Sequence[int] | torch.Tensor,
    num_experts: int,
    num_ranks: int,
) -> Placement:
    """Build a Placement from a list of replicas and the rank hosting each.

    expert_of_item [P]: logical expert of each replica; rank_of_item [P]: its rank (each rank
    exactly P / num_ranks replicas). Within a rank, slots are ordered by logical expert, so the
    result depends only on how many replicas of each expert each rank hosts.
    """
    experts = torch.as_tensor(expert_of_item, dtype=torch.int64).reshape(-1)
    ranks = torch.as_tensor(rank_of_item, dtype=torch.int64).reshape(-1)
    if experts.numel() != ranks.numel():
        _fail(f"placement: {experts.numel()} replicas but {ranks.numel()} rank assignments")
    if experts.numel() % num_ranks:
        _fail(f"placement: {experts.numel()} slots do not divide over {num_ranks} ranks")
    if ((ranks < 0) | (ranks >= num_ranks)).any():
        _fail(f"placement: a rank assignment is outside 0..{num_ranks - 1}")
    per_rank = torch.bincount(ranks, minlength=num_ranks)
    if (per_rank != experts.numel() // num_ranks).any():
        _fail(f"placement: ranks host unequal slot counts {per_rank.tolist()}")
    order = torch.argsort(ranks * max(num_experts, 1) + experts, stable=True)
    phy2log = experts[order]
    if ((phy2log < 0) | (phy2log >= num_experts)).any():
        _fail(f"placement: a replica names an expert outside 0..{num_experts - 1}")
    return Placement(
        phy2log=phy2log,
        log2phy=_log2phy(phy2log, num_experts),
        logcnt=torch.bincount(phy2log, minlength=num_experts),
        slot_rank=torch.arange(phy2log.numel()) // (phy2log.numel() // num_ranks),
        num_ranks=num_ranks,
    )


# ---------------------------------------------------------------------------------------------
# measures


def _check_load(load: Any) -> torch.Tensor:
    """load [E] -> float64 [E], ConfigError unless finite, non-negative, 1-D, non-empty."""
    if not isinstance(load, torch.Tensor):
        load = torch.as_tensor(load)
    if load.dim() != 1 or load.numel() == 0:
        _fail(f"load must be a non-empty 1-D tensor [E], got shape {list(load.shape)}")
    load = load.detach().to("cpu", torch.float64)
    if not torch.isfinite(load).all() or (load < 0).any():
        _fail("load must be finite and non-negative")
    return load


def _check_sizes(num_experts: int, num_slots: int, num_ranks: int, num_nodes: int = 1) -> None:
    for name, value in (("num_slots", num_slots), ("num_ranks", num_ranks),
                        ("num_nodes", num_nodes)):
        if type(value) is not int or value < 1:
            _fail(f"{name} must be a positive int, got {value!r}")
    if num_slots < num_experts:
        _fail(f"num_slots {num_slots} < {num_experts} logical experts: every expert needs a slot")
    if num_slots % num_ranks:
        _fail(f"num_slots {num_slots} is not divisible by num_ranks {num_ranks} "
              "(every rank hosts the same number of slots)")
    if num_ranks % num_nodes:
        _fail(f"num_ranks {num_ranks} is not divisible by num_nodes {num_nodes}")


def rank_loads(placement: Placement, load: torch.Tensor) -> torch.Tensor:
    """Load of each rank [EP] float64 under ``placement`` for expert loads ``load [E]`` (each
    replica gets load / logcnt of its expert)."""
    load = _check_load(load)
    if load.numel() != placement.num_experts:
        _fail(f"load has {load.numel()} experts, the placement {placement.num_experts}")
    slot_load = (load / placement.logcnt)[placement.phy2log]
    return torch.zeros(placement.num_ranks, dtype=torch.float64).index_add_(
        0, placement.slot_rank, slot_load
    )


def peak_over_mean(placement: Placement, load: torch.Tensor) -> float:
    """max / mean of the rank loads [EP] (1 = perfect balance; 1 when there is no load)."""
    loads = rank_loads(placement, load)
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


def _rank_peak(placement: Placement, load: torch.Tensor) -> float:
    return float(rank_loads(placement, load).max())


def lower_bound(load: torch.Tensor, num_slots: int, num_ranks: int) -> float:
    """A load that no placement's peak rank load can go below (same units as ``load [E]``).

    The largest of:
    - total / EP (perfect balance);
    - max_e load_e / min(EP, P - E + 1): an expert is spread over at most that many ranks
      (it has at most P - E + 1 replicas, every other expert needs a slot);
    - the smallest possible largest slot weight, max_e load_e / c_e minimised over replica counts
      (``replicate_greedy`` attains it: water-filling is optimal for this min-max);
    - the "big slot" bound: for a peak T, two slots heavier than T / 2 cannot share a rank, so at
      most EP slots are big. An expert kept big needs c_e >= ceil(load_e / T) slots, all big; one
      made small needs c_e >= ceil(2 load_e / T). If the fewest slots meeting this with at most EP
      big ones (a knapsack over experts) exceeds P, no plan reaches T. Bisection on T returns a T
      shown infeasible, so the bound is rigorous.
    """
    load = _check_load(load)
    num_experts = load.numel()
    _check_sizes(num_experts, num_slots, num_ranks)
    total, largest = float(load.sum()), float(load.max())
    if largest == 0:
        return 0.0
    counts = replicate_greedy(load, num_slots)
    bound = max(
        total / num_ranks,
        largest / min(num_ranks, num_slots - num_experts + 1),
        float((load / counts).max()),
    )
    upper = _rank_peak(eplb_placement(load, num_slots, num_ranks), load)
    if upper <= bound * (1 + _REL_TOL):
        return bound
    loads = load.tolist()
    if _big_slot_feasible(loads, bound, num_slots, num_ranks):
        return bound  # feasibility is monotone in T: the big-slot bound is below ``bound``
    return _bisect_infeasible(loads, bound, upper, num_slots, num_ranks)


def _bisect_infeasible(loads: list[float], lo: float, hi: float, num_slots: int,
                       num_ranks: int) -> float:
    """Bisection between ``lo`` (ruled out by ``_big_slot_feasible``) and ``hi`` (an achieved
    peak): the largest T found ruled out, a valid lower bound."""
    for _ in range(50):
        mid = (lo + hi) / 2
        if _big_slot_feasible(loads, mid, num_slots, num_ranks):
            hi = mid
        else:
            lo = mid
    return lo


def _big_slot_feasible(loads: list[float], peak: float, num_slots: int, num_ranks: int) -> bool:
    """False when no plan can have every rank load <= ``peak`` by the big-slot argument of
    ``lower_bound`` (True means only: not ruled out)."""
    if peak <= 0:
        return False
    base, choices = 0, []  # slots every small expert needs; (big slots, slots saved) per option
    for value in loads:
        need = math.ceil(value / peak - 1e-12)  # replicas so that each is <= peak
        need = max(need, 1)
        small = max(math.ceil(2 * value / peak - 1e-12), 1)  # replicas so that each is <= peak/2
        base += small
        if value / need > peak / 2 and small > need:
            choices.append((need, small - need))
    # 0/1 knapsack: at most num_ranks big slots, maximise slots saved
    best = [0] * (num_ranks + 1)
    for weight, saved in choices:
        for cap in range(num_ranks, weight - 1, -1):
            best[cap] = max(best[cap], best[cap - weight] + saved)
    return base - best[num_ranks] <= num_slots


# ---------------------------------------------------------------------------------------------
# EPLB's greedy steps (reimplemented from their description in DeepSeek's EPLB)


def replicate_greedy(load: torch.Tensor, num_slots: int) -> torch.Tensor:
    """load [E] -> logcnt [E] int64 summing to ``num_slots``: start from one replica each and
    repeatedly give one more to the expert with the largest load per replica (ties: lowest
    index). Minimises the largest per-replica load."""
    load = _check_load(load)
    num_experts = load.numel()
    if type(num_slots) is not int or num_slots < num_experts:
        _fail(f"num_slots must be an int >= {num_experts} (the logical experts), got {num_slots!r}")
    counts = [1] * num_experts
    values = load.tolist()
    heap = [(-v, e) for e, v in enumerate(values)]  # (-load per replica, expert): lowest e on ties
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-values[e] / counts[e], e))
    return torch.tensor(counts, dtype=torch.int64)


def pack_greedy(weights: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """weights [n] (n = num_ranks * slots_per_rank) -> rank of each item [n] int64: items in
    decreasing weight (ties: lowest index) each go to the lightest rank that still has a free slot
    (ties: lowest rank), so every rank gets exactly ``slots_per_rank`` items."""
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.dim() != 1 or weights.numel() != num_ranks * slots_per_rank:
        _fail(f"pack_greedy: expected {num_ranks} x {slots_per_rank} weights, got shape "
              f"{list(weights.shape)}")
    return torch.tensor(_pack_lpt(weights.double().tolist(), list(range(num_ranks)),
                                  slots_per_rank), dtype=torch.int64)


def _pack_lpt(weights: list[float], ranks: list[int], slots_per_rank: int) -> list[int]:
    """List form of ``pack_greedy`` over the given rank ids: rank id of each item."""
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    heap = [(0.0, r) for r in ranks]  # (load, rank) of ranks with a free slot
    heapq.heapify(heap)
    used = dict.fromkeys(ranks, 0)
    out = [0] * len(weights)
    for i in order:
        rank_load, r = heapq.heappop(heap)
        out[i] = r
        used[r] += 1
        if used[r] < slots_per_rank:
            heapq.heappush(heap, (rank_load + weights[i], r))
    return out


def _items(counts: Sequence[int], loads: Sequence[float]) -> tuple[list[int], list[float]]:
    """Replica list: expert of each replica [P] and its weight load / count [P]."""
    experts, weights = [], []
    for e, (c, value) in enumerate(zip(counts, loads)):
        experts += [e] * c
        weights += [value / c] * c
    return experts, weights


def eplb_placement(load: torch.Tensor, num_slots: int, num_ranks: int,
                   num_nodes: int = 1) -> Placement:
    """EPLB's baseline plan for load [E] on ``num_slots`` slots over ``num_ranks`` ranks:
    ``replicate_greedy`` then ``pack_greedy`` of the replicas by weight load / count. With
    ``num_nodes`` > 1 the replicas are first packed greedily to nodes (P / num_nodes slots each),
    then to the node's GPUs (ranks n * G .. n * G + G - 1, G = num_ranks / num_nodes). (DeepSeek's
    hierarchical mode also packs expert groups to nodes before replicating; experts have no
    groups here.)"""
    load = _check_load(load)
    _check_sizes(load.numel(), num_slots, num_ranks, num_nodes)
    counts = replicate_greedy(load, num_slots).tolist()
    experts, weights = _items(counts, load.tolist())
    ranks = _pack_hierarchical(weights, num_ranks, num_nodes, improve=False)
    return placement_from_ranks(experts, ranks, load.numel(), num_ranks)


# ---------------------------------------------------------------------------------------------
# joint search


def _improve_by_swaps(weights: list[float], assign: list[int], ranks: list[int],
                      max_swaps: int) -> None:
    """Swap slots between the heaviest of ``ranks`` and another of them while that lowers the
    heaviest's load and leaves the other below the old peak (in place). At a fixed point the
    heaviest rank H and any other rank N satisfy load_H - load_N <= max weight: if not, every
    slot of H would be no heavier than every slot of N, and with equal slot counts load_H <=
    load_N."""
    members: dict[int, list[int]] = {r: [] for r in ranks}
    for i, r in enumerate(assign):
        if r in members:
            members[r].append(i)
    loads = {r: sum(weights[i] for i in members[r]) for r in ranks}
    for _ in range(max_swaps):
        heavy = max(ranks, key=lambda r: (loads[r], -r))
        peak = loads[heavy]
        best = None  # (new max of the pair, other rank, item of heavy, item of other)
        for other in ranks:
            if other == heavy:
                continue
            gap = peak - loads[other]
            if gap <= peak * _REL_TOL:
                continue
            for a in members[heavy]:
                wa = weights[a]
                for b in members[other]:
                    d = wa - weights[b]
                    if d <= 0 or d >= gap:
                        continue
                    new_max = max(peak - d, loads[other] + d)
                    if best is None or new_max < best[0]:
                        best = (new_max, other, a, b)
        if best is None or best[0] >= peak * (1 - _REL_TOL):
            return
        _, other, a, b = best
        d = weights[a] - weights[b]
        members[heavy].remove(a)
        members[other].remove(b)
        members[heavy].append(b)
        members[other].append(a)
        assign[a], assign[b] = other, heavy
        loads[heavy] -= d
        loads[other] += d


def _pack_hierarchical(weights: list[float], num_ranks: int, num_nodes: int,
                       improve: bool) -> list[int]:
    """Rank of each item: to nodes (greedy, then swaps between nodes when ``improve``), then to
    the GPUs of each node (greedy, then swaps within the node when ``improve``)."""
    n = len(weights)
    slots_per_rank = n // num_ranks
    gpus = num_ranks // num_nodes
    if num_nodes == 1:
        node = [0] * n
    else:
        node = _pack_lpt(weights, list(range(num_nodes)), n // num_nodes)
        if improve:
            _improve_by_swaps(weights, node, list(range(num_nodes)), max_swaps=4 * n)
    assign = [0] * n
    for nd in range(num_nodes):
        idx = [i for i in range(n) if node[i] == nd]
        local_ranks = list(range(nd * gpus, (nd + 1) * gpus))
        sub = [weights[i] for i in idx]
        local = _pack_lpt(sub, local_ranks, slots_per_rank)
        if improve:
            _improve_by_swaps(sub, local, local_ranks, max_swaps=4 * len(idx))
        for i, r in zip(idx, local):
            assign[i] = r
    return assign


def _score(weights: list[float], assign: list[int], num_ranks: int) -> tuple[float, int, float]:
    """(peak rank load, ranks at the peak, sum of squared rank loads): smaller is better."""
    loads = [0.0] * num_ranks
    for w, r in zip(weights, assign):
        loads[r] += w
    peak = max(loads)
    at_peak = sum(1 for x in loads if x >= peak * (1 - _REL_TOL))
    return peak, at_peak, sum(x * x for x in loads)


def _better(a: tuple[float, int, float], b: tuple[float, int, float]) -> bool:
    """Whether score ``a`` is strictly better than ``b`` (peaks compared with a tolerance)."""
    tol = _REL_TOL * max(abs(b[0]), 1e-300)
    if a[0] < b[0] - tol:
        return True
    if a[0] > b[0] + tol:
        return False
    if a[1] != b[1]:
        return a[1] < b[1]
    return a[2] < b[2] * (1 - 1e-12)


def _search_counts(loads: list[float], counts: list[int], num_ranks: int,
                   num_nodes: int) -> tuple[list[int], list[int], tuple[float, int, float]]:
    """Local search over replica counts from ``counts``: move one replica (or, when no single
    move helps, 2 .. _MAX_STEP at once) from a donor expert to a recipient, re-pack (greedy + swaps), accept the first move that improves the score; stop
    when none does. Candidates: the experts on the peak rank(s) on both sides, plus the heaviest
    replicas as recipients and the experts that lose least by giving one up as donors."""

    def evaluate(c: list[int]) -> tuple[list[int], list[int], tuple[float, int, float]]:
        experts, weights = _items(c, loads)
        assign = _pack_hierarchical(weights, num_ranks, num_nodes, improve=True)
        return experts, assign, _score(weights, assign, num_ranks)

    num_experts = len(loads)
    experts, assign, score = evaluate(counts)
    for _ in range(_MAX_MOVES):
        _, weights = _items(counts, loads)
        rank_load = [0.0] * num_ranks
        for w, r in zip(weights, assign):
            rank_load[r] += w
        peak = max(rank_load)
        on_peak = sorted({experts[i] for i, r in enumerate(assign)
                          if rank_load[r] >= peak * (1 - _REL_TOL)})
        heaviest = sorted(range(num_experts), key=lambda e: (-loads[e] / counts[e], e))
        cheapest = sorted((e for e in range(num_experts) if counts[e] > 1),
                          key=lambda e: (loads[e] / (counts[e] - 1), e))
        recipients = list(dict.fromkeys(on_peak + heaviest[:_MOVE_CANDIDATES]))
        donors = [e for e in dict.fromkeys(cheapest[:_MOVE_CANDIDATES] + on_peak)
                  if counts[e] > 1]
        moved = False
        for step in range(1, _MAX_STEP + 1):  # larger transfers only when single ones fail
            for b in recipients:
                for a in donors:
                    if a == b or counts[a] <= step:
                        continue
                    trial = list(counts)
                    trial[a] -= step
                    trial[b] += step
                    t_experts, t_assign, t_score = evaluate(trial)
                    if _better(t_score, score):
                        counts, experts, assign, score = trial, t_experts, t_assign, t_score
                        moved = True
                        break
                if moved:
                    break
            if moved:
                break
        if not moved:
            break
    return experts, assign, score


def _threshold_counts(loads: list[float], num_slots: int, cap: float) -> list[int] | None:
    """Replica counts keeping every replica <= ``cap`` (fewest such), the spare slots going one
    at a time to the unsplit expert with the largest load (ties: lowest index), so that they
    shrink the small slots that share ranks with the big ones. None if more than P slots."""
    counts = [max(1, math.ceil(value / cap - 1e-12)) for value in loads]
    spare = num_slots - sum(counts)
    if spare < 0:
        return None
    unsplit = [e for e, c in enumerate(counts) if c == 1] or list(range(len(loads)))
    heap = [(-loads[e], e) for e in unsplit]
    heapq.heapify(heap)
    for _ in range(spare):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-loads[e] / counts[e], e))
    return counts


def _starting_counts(loads: list[float], num_slots: int, num_ranks: int,
                     num_nodes: int) -> list[int]:
    """The best-scoring start for the local search among EPLB's greedy counts and
    ``_threshold_counts`` for up to _STARTS caps (load_e / k for k = 1 .. EP, between the least
    possible largest replica and the largest load, evenly spread over their sorted values). Single
    replica moves from EPLB's counts can stall where the optimum has fewer replicas of a hot
    expert (e.g. loads [108, 6418, 566] on 4 ranks x 2 slots: 6 -> 4 replicas of the hot one)."""
    greedy = replicate_greedy(torch.tensor(loads, dtype=torch.float64), num_slots).tolist()
    floor = max(v / c for v, c in zip(loads, greedy))
    caps = sorted({v / k for v in loads for k in range(1, num_ranks + 1)
                   if v > 0 and floor * (1 - _REL_TOL) <= v / k})
    if len(caps) > _STARTS:
        caps = [caps[round(i * (len(caps) - 1) / (_STARTS - 1))] for i in range(_STARTS)]
    best, best_score = greedy, None
    seen = set()
    for counts in [greedy] + [_threshold_counts(loads, num_slots, cap) for cap in caps]:
        if counts is None or tuple(counts) in seen:
            continue
        seen.add(tuple(counts))
        _, weights = _items(counts, loads)
        score = _score(weights, _pack_hierarchical(weights, num_ranks, num_nodes, improve=True),
                       num_ranks)
        if best_score is None or _better(score, best_score):
            best, best_score = counts, score
    return best


def plan_placement(load: torch.Tensor, num_slots: int, num_ranks: int, method: str = "search",
                   *, num_nodes: int = 1, time_limit: float = 60.0) -> Placement:
    """Plan load [E] onto ``num_slots`` slots over ``num_ranks`` ranks (``num_nodes`` nodes of
    num_ranks / num_nodes GPUs, packed node first) for the smallest peak rank load.

    method:
    - "eplb": ``eplb_placement``;
    - "search": local search over replica counts from EPLB's, each scored by a greedy packing
      improved by slot swaps (``_search_counts``); EPLB's plan is returned when the search does
      not beat it, so the peak is never above EPLB's;
    - "exact": ``solve_exact`` (MILP, num_nodes = 1 only), never worse than "search" (the search
      result is kept when the solver stops at ``time_limit`` s without a better plan).

    Returns a Placement; deterministic for a given input.
    """
    if method not in METHODS:
        _fail(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    load = _check_load(load)
    _check_sizes(load.numel(), num_slots, num_ranks, num_nodes)
    baseline = eplb_placement(load, num_slots, num_ranks, num_nodes)
    if method == "eplb":
        return baseline
    loads = load.tolist()
    experts, assign, _ = _search_counts(
        loads, _starting_counts(loads, num_slots, num_ranks, num_nodes), num_ranks, num_nodes
    )
    searched = placement_from_ranks(experts, assign, load.numel(), num_ranks)
    best = searched if _rank_peak(searched, load) < _rank_peak(baseline, load) * (1 - _REL_TOL) \
        else baseline
    if method == "exact":
        if num_nodes != 1:
            _fail("method 'exact' plans a single node; use num_nodes=1 or method 'search'")
        exact, _ = solve_exact(load, num_slots, num_ranks, time_limit=time_limit,
                               upper=_rank_peak(best, load))
        if exact is not None and _rank_peak(exact, load) < _rank_peak(best, load) * (1 - _REL_TOL):
            best = exact
    return best


def solve_exact(load: torch.Tensor, num_slots: int, num_ranks: int, *, time_limit: float = 60.0,
                upper: float | None = None) -> tuple[Placement | None, bool]:
    """The placement of load [E] minimising the peak rank load, by a MILP
    (``scipy.optimize.milp``, HiGHS).

    Variables: y[e, k] = 1 when expert e has k replicas (k = 1 .. P - E + 1, one k per expert;
    with ``upper`` only k >= ceil(load_e / upper), the rest capped by the others' minimums);
    z[e, k, r] = replicas of e on rank r when it has k (0 .. min(k, S), summing to k y[e, k]);
    T >= each rank's load sum_{e,k} load_e / k * z[e, k, r] (linear: the division is by the
    enumerated k); every rank holds S slots; rank loads are ordered (symmetry breaking); minimise
    T. ``upper``: a known achievable peak (prunes the search).

    Returns (placement, proven optimal): placement None when the solver found no solution within
    ``time_limit`` seconds. ConfigError when the problem has more than MAX_EXACT_VARIABLES
    integer variables.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    load = _check_load(load)
    num_experts = load.numel()
    _check_sizes(num_experts, num_slots, num_ranks)
    slots_per_rank = num_slots // num_ranks
    scale = float(load.sum()) / num_ranks or 1.0
    values = (load / scale).tolist()
    # replica counts k per expert: with a known achievable peak U, any plan at least as good
    # keeps each replica <= U, so k >= ceil(load / U), and the others' minimums cap k
    if upper is not None and upper > 0:
        kmin = [max(1, math.ceil(v / (upper / scale) * (1 - 1e-9))) for v in values]
    else:
        kmin = [1] * num_experts
    if sum(kmin) > num_slots:
        kmin = [1] * num_experts
    kmax = [num_slots - sum(kmin) + kmin[e] for e in range(num_experts)]
    pairs = [(e, k) for e in range(num_experts) for k in range(kmin[e], kmax[e] + 1)]
    n_y = len(pairs)
    n_z = n_y * num_ranks
    if n_y + n_z > MAX_EXACT_VARIABLES:
        _fail(f"exact placement: {n_y + n_z} integer variables exceed {MAX_EXACT_VARIABLES}; use "
              "method 'search' for this size")

    def y(j: int) -> int:  # j indexes pairs
        return 1 + j

    def z(j: int, r: int) -> int:
        return 1 + n_y + j * num_ranks + r

    n_var = 1 + n_y + n_z
    rows, cols, data, lo, hi = [], [], [], [], []

    def add(row_terms: list[tuple[int, float]], low: float, high: float) -> None:
        row = len(lo)
        for col, coef in row_terms:
            rows.append(row)
            cols.append(col)
            data.append(coef)
        lo.append(low)
        hi.append(high)

    for e in range(num_experts):
        add([(y(j), 1.0) for j, (pe, _) in enumerate(pairs) if pe == e], 1, 1)
    for j, (e, k) in enumerate(pairs):
        add([(z(j, r), 1.0) for r in range(num_ranks)] + [(y(j), -float(k))], 0, 0)
    rank_terms = [[(z(j, r), values[e] / k) for j, (e, k) in enumerate(pairs)]
                  for r in range(num_ranks)]
    for r in range(num_ranks):
        add([(z(j, r), 1.0) for j in range(n_y)], slots_per_rank, slots_per_rank)
        add(rank_terms[r] + [(0, -1.0)], -np.inf, 0)
        if r + 1 < num_ranks:  # symmetry breaking: rank loads non-increasing
            add(rank_terms[r] + [(col, -c) for col, c in rank_terms[r + 1]], 0, np.inf)
    matrix = coo_array((data, (rows, cols)), shape=(len(lo), n_var)).tocsr()
    lower = np.zeros(n_var)
    upper_b = np.ones(n_var)
    upper_b[0] = np.inf if upper is None else upper / scale * (1 + 1e-7)
    for j, (e, k) in enumerate(pairs):
        for r in range(num_ranks):
            upper_b[z(j, r)] = min(k, slots_per_rank)
    integrality = np.ones(n_var)
    integrality[0] = 0
    cost = np.zeros(n_var)
    cost[0] = 1.0
    result = milp(cost, constraints=LinearConstraint(matrix, lo, hi), bounds=Bounds(lower, upper_b),
                  integrality=integrality,
                  options={"time_limit": float(time_limit), "mip_rel_gap": 1e-9})
    if result.x is None:
        return None, False
    x = np.rint(result.x).astype(np.int64)
    experts, ranks = [], []
    for j, (e, _) in enumerate(pairs):
        for r in range(num_ranks):
            experts += [e] * int(x[z(j, r)])
            ranks += [r] * int(x[z(j, r)])
    return placement_from_ranks(experts, ranks, num_experts, num_ranks), result.status == 0


# ---------------------------------------------------------------------------------------------
# memory


def expert_bytes_per_rank(placement: Placement, full_bytes: torch.Tensor, quantized: torch.Tensor,
                          int8_bytes: torch.Tensor) -> torch.Tensor:
    """Expert weight bytes each rank stores [EP] int64.

    full_bytes [E]: bytes of each expert in the model dtype; int8_bytes [E]: the same expert stored
    int8 weight-only (1 byte per parameter plus its scales); quantized [P] bool: which slots are
    stored int8.
    """
    full_bytes = torch.as_tensor(full_bytes, dtype=torch.int64)
    int8_bytes = torch.as_tensor(int8_bytes, dtype=torch.int64)
    quantized = torch.as_tensor(quantized, dtype=torch.bool)
    for name, t, n in (("full_bytes", full_bytes, placement.num_experts),
                       ("int8_bytes", int8_bytes, placement.num_experts),
                       ("quantized", quantized, placement.num_slots)):
        if list(t.shape) != [n]:
            _fail(f"{name} must have shape [{n}], got {list(t.shape)}")
    slot_bytes = torch.where(quantized, int8_bytes[placement.phy2log], full_bytes[placement.phy2log])
    return torch.zeros(placement.num_ranks, dtype=torch.int64).index_add_(
        0, placement.slot_rank, slot_bytes
    )


def unreplicated_bytes_per_rank(full_bytes: torch.Tensor, num_ranks: int) -> int:
    """Largest per-rank expert bytes of the unreplicated model (expert e on rank e // (E / EP)),
    full_bytes [E]. ConfigError when E is not divisible by EP."""
    full_bytes = torch.as_tensor(full_bytes, dtype=torch.int64)
    if full_bytes.numel() % num_ranks:
        _fail(f"{full_bytes.numel()} experts do not divide over {num_ranks} ranks: give the "
              "memory budget explicitly")
    return int(full_bytes.reshape(num_ranks, -1).sum(dim=1).max())


def choose_int8(placement: Placement, importance: torch.Tensor, full_bytes: torch.Tensor,
                int8_bytes: torch.Tensor, budget: int | None = None, *,
                replicas_first: bool = False) -> torch.Tensor:
    """Which slots to store int8 [P] bool so that every rank's expert bytes stay within
    ``budget`` (default: the unreplicated model's largest per-rank bytes).

    importance [E] (higher = keep in full precision), full_bytes [E], int8_bytes [E]. Experts are
    quantized whole (all their replicas, so every replica computes the same function), least
    important first (ties: lowest index), skipping those with no slot on a rank over budget, until
    every rank fits. With ``replicas_first`` the extra replicas (every slot but an expert's first)
    on ranks over budget go int8 first, least important expert first, before whole experts.
    ConfigError when even all-int8 does not fit.
    """
    importance = torch.as_tensor(importance, dtype=torch.float64)
    if list(importance.shape) != [placement.num_experts]:
        _fail(f"importance must have shape [{placement.num_experts}], got {list(importance.shape)}")
    if budget is None:
        budget = unreplicated_bytes_per_rank(full_bytes, placement.num_ranks)
    quantized = torch.zeros(placement.num_slots, dtype=torch.bool)

    def over() -> torch.Tensor:
        return expert_bytes_per_rank(placement, full_bytes, quantized, int8_bytes) > budget

    order = sorted(range(placement.num_experts), key=lambda e: (float(importance[e]), e))
    if replicas_first:
        for e in order:
            if not over().any():
                return quantized
            extra = placement.log2phy[e, 1:int(placement.logcnt[e])]
            hot = extra[over()[placement.slot_rank[extra]]]
            quantized[hot] = True
    for e in order:
        bad = over()
        if not bad.any():
            return quantized
        slots = placement.log2phy[e, :int(placement.logcnt[e])]
        if bad[placement.slot_rank[slots]].any():
            quantized[slots] = True
    if over().any():
        worst = int(expert_bytes_per_rank(placement, full_bytes, quantized, int8_bytes).max())
        _fail(f"memory budget {budget} bytes per rank is too small: with every expert int8 a rank "
              f"still stores {worst} bytes")
    return quantized


# ---------------------------------------------------------------------------------------------
# plan files


def save_plan(path: str | Path, plans: Mapping[int, Placement], provenance: Mapping[str, Any]) -> None:
    """Write ``plans`` ({layer: Placement}) and their calibration ``provenance`` (model, data,
    command; date added when missing, UTC ISO) to ``path`` as JSON, atomically
    (``moebalance.files.write_text_atomic``)."""
    if not plans:
        _fail("save_plan: no layers to save")
    missing = [key for key in ("model", "data", "command") if key not in provenance]
    if missing:
        _fail(f"save_plan: provenance lacks {', '.join(missing)}")
    experts = {p.num_experts for p in plans.values()}
    if len(experts) != 1:
        _fail(f"save_plan: layers plan different numbers of experts {sorted(experts)}")
    provenance = dict(provenance)
    provenance.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"))
    document = {
        "format": PLAN_FORMAT,
        "num_experts": experts.pop(),
        "provenance": provenance,
        "layers": {
            str(int(layer)): {
                "num_ranks": p.num_ranks,
                "num_slots": p.num_slots,
                "phy2log": p.phy2log.tolist(),
                "log2phy": p.log2phy.tolist(),
                "logcnt": p.logcnt.tolist(),
            }
            for layer, p in sorted(plans.items())
        },
    }
    # one line per list of integers: readable, and 10x shorter than one number per line
    text = re.sub(r"\[[-\d,\s]*\]", lambda m: " ".join(m.group(0).split()),
                  json.dumps(document, indent=1))
    write_text_atomic(Path(path), text + "\n")


def load_plan(path: str | Path, num_experts: int | None = None, num_ranks: int | None = None
              ) -> tuple[dict[int, Placement], dict[str, Any]]:
    """Read a plan written by ``save_plan``: ({layer: Placement}, provenance). Checks the format
    tag, every layer's maps, and (when given) that the plan is for ``num_experts`` logical
    experts and ``num_ranks`` EP ranks. ConfigError (one line) for anything else."""
    path = Path(path)
    where = f"placement file {path}"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"{where} not found")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        _fail(f"{where}: not readable JSON ({err})")
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        _fail(f"{where}: format must be {PLAN_FORMAT!r}, got {found!r}")
    stored = document.get("num_experts")
    if type(stored) is not int or stored < 1:
        _fail(f"{where}: num_experts must be a positive int, got {stored!r}")
    if num_experts is not None and stored != num_experts:
        _fail(f"{where} plans {stored} experts but the model has {num_experts}")
    provenance = document.get("provenance")
    if not isinstance(provenance, dict):
        _fail(f"{where}: provenance must be a mapping")
    layers = document.get("layers")
    if not isinstance(layers, dict) or not layers:
        _fail(f"{where}: layers must be a non-empty mapping {{layer: plan}}")
    plans = {}
    for key, entry in layers.items():
        if not key.isdigit():
            _fail(f"{where}: layer key {key!r} is not a layer index")
        lw = f"{where} layer {key}"
        if not isinstance(entry, dict):
            _fail(f"{lw}: expected a mapping")
        fields = {}
        for name in ("num_ranks", "num_slots", "phy2log", "log2phy", "logcnt"):
            if name not in entry:
                _fail(f"{lw}: missing {name}")
            fields[name] = entry[name]
        if num_ranks is not None and fields["num_ranks"] != num_ranks:
            _fail(f"{lw} is planned for EP {fields['num_ranks']}, the run uses EP {num_ranks}")
        try:
            tensors = {name: torch.tensor(fields[name], dtype=torch.int64)
                       for name in ("phy2log", "log2phy", "logcnt")}
        except (TypeError, ValueError, RuntimeError, OverflowError):
            _fail(f"{lw}: phy2log, log2phy and logcnt must be (nested) lists of integers")
        if tensors["logcnt"].numel() != stored:
            _fail(f"{lw}: logcnt has {tensors['logcnt'].numel()} experts, the file {stored}")
        if tensors["phy2log"].dim() != 1 or tensors["phy2log"].numel() != fields["num_slots"]:
            _fail(f"{lw}: phy2log must list num_slots = {fields['num_slots']!r} experts")
        ep = fields["num_ranks"]
        if type(ep) is not int or ep < 1 or tensors["phy2log"].numel() % ep:
            _fail(f"{lw}: num_ranks {ep!r} must be a positive int dividing num_slots")
        try:
            plans[int(key)] = Placement(
                phy2log=tensors["phy2log"], log2phy=tensors["log2phy"], logcnt=tensors["logcnt"],
                slot_rank=torch.arange(tensors["phy2log"].numel()) // (tensors["phy2log"].numel() // ep),
                num_ranks=ep,
            )
        except ConfigError as err:
            _fail(f"{lw}: {err}")
    return plans, provenance


def check_plans_fit(
    plans: Mapping[int, Placement], *, num_experts: int, moe_layers: Sequence[int], ep_size: int
) -> int:
    """The slots per MoE layer P of ``plans`` ({0-based layer: Placement}) for a model with
    ``num_experts`` logical experts in ``moe_layers`` served at EP ``ep_size``; ConfigError (one
    line) when a plan is for another model or EP size, a MoE layer has no plan, a plan names a
    layer that is not a MoE layer, or layers differ in P (the frameworks size every MoE layer
    alike)."""
    if not plans:
        _fail("the placement has no layers")
    layers, extra = set(moe_layers), sorted(set(plans) - set(moe_layers))
    missing = sorted(layers - set(plans))
    if missing or extra:
        _fail(f"the placement must plan exactly the MoE layers {sorted(layers)}; "
              f"missing {missing}, not MoE layers {extra}")
    for layer, p in sorted(plans.items()):
        if p.num_experts != num_experts:
            _fail(f"the placement of layer {layer} plans {p.num_experts} experts, the model has "
                  f"{num_experts}")
        if p.num_ranks != ep_size:
            _fail(f"the placement of layer {layer} is for EP {p.num_ranks}, the run uses EP "
                  f"{ep_size}")
    slots = {p.num_slots for p in plans.values()}
    if len(slots) != 1:
        _fail(f"every MoE layer's placement must have the same number of slots, got {sorted(slots)}")
    return slots.pop()

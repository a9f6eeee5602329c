"""Hall levels: per-expert targets of LASER's assignment from the structure of the pools.

The least possible peak can lie above the water level: when a set X of experts is the only
place some tokens can go (a token whose pool has fewer than k candidates outside X must put
the rest in X), X has to hold at least F(X) = sum_t max(0, k - |pool_t - X|) assignments
whatever the assignment, so its experts cannot all stay below (F(X) + base(X)) / |X| (Hall's
condition of the b-matching; max-flow min-cut makes it exact over all X).

``hall_levels`` evaluates this bound on the E nested sets "the j experts with the largest
base + demand" at once and turns the E prefix totals into per-expert targets: the slopes of
their least concave majorant (the non-increasing fit of the increments), so that every block
of experts whose tokens have nowhere else to go gets the level its forced load sets, and the
others the level the rest of the load sets. The highest level is a lower bound on the peak
of any assignment; on the pools of real routing it is usually the peak the exact solver
finds (``moebalance.assignment_optimum`` checks it in the tests and the benchmark).

An assignment at the bound takes a token's candidates level by level, lowest first (a token
holding an expert of a higher level while one of a lower level is free could move and lower
the higher level); the blocked pricing orders every token's candidates that way. Every token
then has a *boundary level*, that of its k-th lowest candidate: it takes the candidates below
it for sure, chooses among those at it, and avoids those above it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .indexing import pick

__all__ = ["HallLevels", "hall_levels"]

_INF = float("inf")


class HallLevels(NamedTuple):
    """``hall_levels``'s result."""

    target: torch.Tensor  # [E] float32: integer target load of each expert (>= its base)
    bound: torch.Tensor  # 0-dim float32: a lower bound on the peak of any assignment
    level: torch.Tensor  # [E] float32: dense rank of the targets (0 = lowest level)
    relative: torch.Tensor | None  # [T, c] float32 (``choices=True``): each candidate's target
    # minus the token's boundary target (< 0: taken for sure, 0: chosen among, > 0: avoided)


@functools.lru_cache(maxsize=16)
def _triangle(num_experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([E, E] float32 lengths b - a + 1 clamped to >= 1, [E, E] bool a <= b), cached (normal
    tensors whoever asks first)."""
    with torch.inference_mode(False):
        a = torch.arange(num_experts, device=device)
        length = (a.unsqueeze(0) - a.unsqueeze(1) + 1).float()
        return length.clamp(min=1), length > 0


def hall_levels(
    pool_idx: torch.Tensor,
    valid: torch.Tensor | None,
    flexible: torch.Tensor,
    base: torch.Tensor,
    k: int,
    demand: torch.Tensor,
    choices: bool = False,
) -> HallLevels:
    """Targets, their levels and a lower bound on the peak (see the module doc).

    pool_idx: [T, c] candidates; valid: [T, c] bool or None (all); flexible: [T] bool; base:
    [E] float starting loads; demand: [E] float, flexible tokens listing each expert as a valid
    candidate. Experts are ordered by base + demand (largest first); F of the j first ones is
    counted from each token's k candidates last in that order (one sort of [T, c] ranks);
    target_i = min_{a <= i} max_{b >= i} (P_b - P_{a-1}) / (b - a + 1) over the prefix totals
    P (forced load plus base), rounded up. About 30 tensor ops; no host synchronisation.

    ``choices``: also each token's boundary target (its k-th lowest candidate target; an
    assignment at the bound takes the candidates below it, chooses among those at it and
    avoids those above) and every candidate's target relative to it.
    """
    E = base.numel()
    dev = base.device
    order = torch.argsort(base + demand, descending=True, stable=True)
    rank = torch.empty(E, dtype=torch.int32, device=dev)
    rank.scatter_(0, order, torch.arange(E, dtype=torch.int32, device=dev))
    r = pick(rank, pool_idx)  # [T, c] int32: 0 = hottest
    if valid is not None:
        r = r.masked_fill(~valid, -1)  # never among a token's k last
    last = torch.sort(r, dim=1, descending=True)[0][:, :k]  # the k coldest valid candidates
    weight = flexible.float().repeat_interleave(k)
    forced = torch.bincount(last.reshape(-1), weight, minlength=E)  # by rank
    base_by_rank = pick(base, order)
    prefix = torch.cat([forced.new_zeros(1), (forced + base_by_rank).cumsum(0)])
    length, upper = _triangle(E, dev)
    mean = (prefix[1:].unsqueeze(0) - prefix[:-1].unsqueeze(1)) / length  # [a, b]: mean of a..b
    mean = mean.masked_fill(~upper, -_INF)
    worst = mean.flip(1).cummax(1)[0].flip(1).masked_fill(~upper, _INF)  # max over b >= i
    slope = worst.cummin(0)[0].diagonal()  # [E] by rank, non-increasing
    by_rank = torch.maximum(slope.sub_(1e-3).ceil_(), base_by_rank)
    target = torch.empty_like(by_rank).scatter_(0, order, by_rank)
    # dense rank of the targets: how many distinct smaller values
    ascending, where = torch.sort(target)
    new = torch.cat([ascending.new_zeros(1), (ascending[1:] > ascending[:-1]).float()])
    level = torch.empty_like(target).scatter_(0, where, new.cumsum(0))
    relative = None
    if choices:
        relative = pick(by_rank, r.clamp(min=0).long()) - pick(by_rank, last[:, k - 1:].long())
    return HallLevels(target, by_rank.max(), level, relative)

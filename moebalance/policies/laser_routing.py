"""LASER: score-distribution-adaptive candidate pools with least-loaded assignment.

Method (Shahout, Cai, Du, Yu, Mitzenmacher, arXiv 2510.03293), as this project defines the
details the paper leaves open:

1. Shape test. S = the token's score distribution over all experts. If the mass of its ``top_m``
   largest scores is >= ``eps_high`` the token is *skewed* and takes vanilla top-k.
2. Pool. Every other (*flexible*) token gets the c = ``pool_size`` experts vanilla selection
   ranks best (group limits respected), minus those scoring below ``min_score_ratio`` x its best
   score (its k best are always kept). ``load_only`` makes the pool all experts.
3. Assignment. Each flexible token takes k experts of its pool, preferring the least loaded.
   Loads start from ``RoutingContext.expert_load`` (EP-global counts from the adapter, or zero)
   plus the skewed tokens' choices, and are reset per call (per batch, per layer).
4. Weights: the gate's own weights at the chosen experts (softmax over the chosen logits for
   softmax-post gates), so c = k is exactly vanilla top-k.

The paper's assignment is sequential over tokens (``laser_reference`` below, kept for tests).
``laser`` is the vectorised version. Tokens go in geometrically shrinking chunks; within a chunk,
a few rounds of proposals against per-expert quotas derived from the water level (the smallest
integer load at which the experts the pending tokens can reach absorb all pending assignments).
See ``laser`` and ``_assign_chunk``. Rounds of single-token moves from busier to idler
candidates follow (``_refine``): bulk moves toward the water level (``settle_rounds``), then
moves that lower the peak (``polish_rounds``). On the calibrated benchmark workloads the result
has a lower max violation than the sequential greedy in every cell (results/routers_cpu.md).
No Python loop over tokens, no host synchronisation.

That is several thousand small tensor ops per call (about 10x vanilla top-k's time on CPU at
8K tokens). ``assignment="price"`` (the ``laser_fast`` router, ``price_assign``) trades balance for
speed: one price per expert, computed from the demand, each token taking the k cheapest of
its candidates under fixed Gumbel tie noise; about 100 ops per call instead of 5,600,
1.3-1.6x vanilla's time, loads a few percent above the water level instead of at it.

``load_only`` (every pool = all experts) has an exact closed form instead: water-filling to the
least possible maximum and McNaughton's wrap-around to deal the slots (``load_only_indices``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..config import GateConfig, LaserParams, RoutingContext
from ..routing import Routing, routing_from_indices
from .gate import (
    gate_weights,
    score_distribution,
    select_topk,
    selection_scores,
    topk_nonnegative,
)

__all__ = [
    "laser",
    "laser_reference",
    "water_level",
    "capped_water_level",
    "load_only_indices",
    "laser_plan",
    "LaserPlan",
    "price_assign",
]


def water_level(base: torch.Tensor, need: torch.Tensor, reachable: torch.Tensor) -> torch.Tensor:
    """Smallest integer L with sum_e max(0, L - base_e) >= need over reachable experts.

    base: [E] float loads; need: 0-dim float; reachable: [E] bool. Returns 0-dim float
    (+inf if nothing is reachable and need > 0). Vectorised over the E candidate fill counts.
    """
    b = torch.where(reachable, base, torch.full_like(base, float("inf")))
    b_sorted, _ = torch.sort(b)
    m = torch.arange(1, b.numel() + 1, device=b.device, dtype=b.dtype)
    # prefix sums with inf kept out of the arithmetic; inf entries make their candidate inf.
    finite = torch.isfinite(b_sorted)
    prefix = torch.cumsum(torch.where(finite, b_sorted, torch.zeros_like(b_sorted)), dim=0)
    cand = torch.maximum(torch.ceil((need + prefix) / m), torch.ceil(b_sorted))
    cand = torch.where(finite, cand, torch.full_like(cand, float("inf")))
    return cand.min()


def capped_water_level(base: torch.Tensor, need: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Smallest integer L with sum_e clamp(L - base_e, 0, limit_e) >= need.

    base, limit: [E] float (integer-valued); need: 0-dim float, at most sum(limit). Returns a
    0-dim float. The sum is piecewise linear in L with breakpoints base_e and base_e + limit_e:
    it is evaluated at all 2E breakpoints at once and solved inside the segment that crosses
    ``need`` (no loop, no host synchronisation).
    """
    bp, _ = torch.sort(torch.cat([base, base + limit]))
    fill = (bp.unsqueeze(1) - base.unsqueeze(0)).clamp(min=0)
    fill = torch.minimum(fill, limit.unsqueeze(0)).sum(dim=1)  # [2E] sum at each breakpoint
    i = torch.argmax((fill >= need).int())  # first breakpoint reaching need
    j = (i - 1).clamp(min=0)
    lo, fill_lo = bp[j], fill[j]
    slope = ((base <= lo) & (lo < base + limit)).sum().float()  # experts filling above ``lo``
    inside = lo + torch.ceil((need - fill_lo) / slope.clamp(min=1))
    return torch.where((i > 0) & (slope > 0), torch.minimum(inside, bp[i]), bp[i])


def load_only_indices(
    num_tokens: int, gate: GateConfig, base: torch.Tensor, first_expert: int = 0
) -> torch.Tensor:
    """[T, k] experts of the load-only router: every token k distinct experts, maximum load minimal.

    Water-filling: with starting loads ``base`` [E], the smallest integer level L whose room
    (each expert at most T more, one per token) holds the T k assignments; every expert is
    filled to L - 1 and just enough of them to L (the least loaded first; ties from expert
    ``first_expert`` onwards, the calling EP rank's first local expert, so that ranks spread
    the extra ones). The T k slots are then laid out expert by expert and dealt to tokens
    column by column (McNaughton's wrap-around): slot j of token t is position j T + t, so a
    token never gets an expert twice because no expert holds more than T slots. The maximum
    load is the least possible, which the sequential greedy can only match. Scores are
    ignored, as the load-only lower bound prescribes.
    """
    k, E = gate.topk, gate.num_experts
    dev = base.device
    base = base.float()
    limit = torch.full_like(base, float(num_tokens))
    need = torch.tensor(float(num_tokens * k), device=dev)
    level = capped_water_level(base, need, limit)
    counts = torch.minimum((level - 1 - base).clamp(min=0), limit)
    short = need - counts.sum()
    # experts that can take one more at ``level``: least loaded first, ties from this rank's
    # first local expert onwards (EP ranks spread their extra slots, each over its own experts)
    rotated = (torch.arange(E, device=dev) + first_expert) % E
    order = rotated[torch.argsort(base[rotated], stable=True)]
    can_sorted = ((base <= level - 1) & (counts < limit))[order]
    extra_sorted = can_sorted & (torch.cumsum(can_sorted.long(), 0) <= short)
    extra = torch.zeros_like(can_sorted).scatter_(0, order, extra_sorted)
    counts = (counts + extra.float()).long()
    slots = torch.repeat_interleave(
        torch.arange(E, device=dev), counts, output_size=num_tokens * k
    )
    return slots.view(k, num_tokens).t()


class LaserPlan(NamedTuple):
    """The shared first half of LASER (``laser_plan``)."""

    vanilla_idx: torch.Tensor  # [T, k] vanilla top-k choices
    flexible: torch.Tensor  # [T] bool: not skewed, assigned from its pool
    pool_idx: torch.Tensor  # [T, c] candidates, best first
    valid: torch.Tensor  # [T, c] bool: candidates kept by min_score_ratio
    base: torch.Tensor  # [E] float32: expert_load + the skewed tokens' vanilla choices
    dist: torch.Tensor  # [T, E] fp32 score distribution S (score_distribution)


def laser_plan(
    logits: torch.Tensor, gate: GateConfig, params: LaserParams, ctx: RoutingContext
) -> LaserPlan:
    """The shared first half of LASER: shape test, pools, starting loads (see ``LaserPlan``)."""
    k, E = gate.topk, gate.num_experts
    c = params.resolved_pool_size(gate)
    m = params.top_m if params.top_m is not None else k
    dist = score_distribution(logits, gate)
    if gate.score_function == "softmax" and gate.pre_softmax:
        sel = dist  # the same fp32 softmax: computed once
    else:
        sel = selection_scores(logits, gate, ctx.expert_bias)
    pool_vals = None  # S at the pool, best first, when the top-k returns it for free
    if c == k:
        vanilla_idx = select_topk(sel, gate, k)
        pool_idx = vanilla_idx  # same call and order as vanilla: c = k reproduces it bit for bit
    elif sel is dist and not gate.group_topk:  # a softmax: non-negative
        pool_vals, pool_idx = topk_nonnegative(sel, c, sorted=True)  # best first
        vanilla_idx = pool_idx[:, :k]
    else:
        pool_idx = select_topk(sel, gate, c, sorted=True)  # best first
        vanilla_idx = pool_idx[:, :k]
    # selection order equals the order of S for plain softmax gates, so the top-M mass can be
    # read off the pool instead of running another top-k
    same_order = gate.score_function == "softmax" and not gate.group_topk
    if params.load_only:
        flexible = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        if pool_vals is not None and m <= c:
            mass = pool_vals[:, :m].sum(dim=1)
        elif same_order and m <= c:
            mass = torch.gather(dist, 1, pool_idx[:, :m]).sum(dim=1)
        else:
            mass = torch.topk(dist, m, dim=1, sorted=False)[0].sum(dim=1)
        flexible = mass < params.eps_high

    valid = torch.ones_like(pool_idx, dtype=torch.bool)
    if params.min_score_ratio > 0 and not params.load_only:
        pool_scores = torch.gather(dist, 1, pool_idx)
        best = pool_scores.max(dim=1, keepdim=True)[0]
        valid = pool_scores >= params.min_score_ratio * best
        valid[:, :k] = True

    base = torch.zeros(E, dtype=torch.float32, device=logits.device)
    if ctx.expert_load is not None:
        base = base + ctx.expert_load.to(device=logits.device, dtype=torch.float32)
    fixed_counts = torch.zeros_like(base).scatter_add_(
        0, vanilla_idx.reshape(-1), (~flexible).float().repeat_interleave(k)
    )
    return LaserPlan(vanilla_idx, flexible, pool_idx, valid, base + fixed_counts, dist)


def _compact(chosen: torch.Tensor, pool_idx: torch.Tensor, k: int) -> torch.Tensor:
    """[T, k] pool entries marked in ``chosen`` [T, c] (exactly k per row), in pool order."""
    slot = torch.cumsum(chosen, dim=1) - 1  # output position of each chosen entry
    slot = torch.where(chosen, slot, torch.full_like(slot, k))  # unchosen -> spill column k
    out = torch.zeros(pool_idx.shape[0], k + 1, dtype=pool_idx.dtype, device=pool_idx.device)
    return out.scatter_(1, slot, pool_idx)[:, :k]


def _finish(logits, gate, vanilla_idx, flexible, chosen_idx, dist=None) -> Routing:
    idx = torch.where(flexible.unsqueeze(1), chosen_idx, vanilla_idx)
    probs, routing_map = routing_from_indices(
        idx, gate_weights(logits, idx, gate, dist), gate.num_experts, like=logits
    )
    return Routing(probs, routing_map, num_dropped=torch.zeros((), dtype=torch.int64, device=logits.device))


def _hash_unit(token: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random numbers in [0, 1) per (token, expert) pair (integer hash)."""
    h = (token * 2654435761 + expert * 40503 + 12345) % 4294967296
    h = (h ^ (h >> 15)) * 2246822519 % 4294967296
    return (h % 65536).float() / 65536.0


def _chunks(num_tokens: int, ratio: float, min_chunk: int) -> list[tuple[int, int]]:
    """Geometrically shrinking token ranges: each takes ``ratio`` of what is left (>= min_chunk)."""
    bounds, start = [], 0
    while start < num_tokens:
        left = num_tokens - start
        size = left if left <= min_chunk else max(min_chunk, int(left * ratio))
        bounds.append((start, start + size))
        start += size
    return bounds


def _assign_chunk(
    ids: torch.Tensor,
    valid: torch.Tensor,
    need: torch.Tensor,
    load: torch.Tensor,
    level_final: torch.Tensor,
    share: torch.Tensor,
    rounds: int,
    slack: float,
    proposal: str,
    jitter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign one chunk of flexible tokens; returns (chosen [n, c] bool, updated load [E]).

    ids [n, c] candidate experts, valid [n, c], need [n] experts still to pick, load [E] float.
    Each expert may take ``share`` (this chunk's fraction of the pending need) of its room below
    ``level_final``, so the room hot experts have is spread over the chunks (tokens that have no
    alternative later still find some). Each round every token proposes to open candidates chosen
    by ``proposal`` ("least_pressure": least load + requests expected from tokens spreading their
    need evenly over their open candidates; "proportional": sampled with probability ~ room /
    expected requests), and each expert accepts in token order up to its quota. What is left
    after ``rounds`` goes to the least-loaded remaining candidates. ``jitter`` [n, c] in [0, 1):
    the tokens' fixed tie-breaking offsets (``_hash_unit``).
    """
    n, c = ids.shape
    E = load.shape[0]
    dev = load.device
    chosen = torch.zeros_like(valid)
    start = load
    # the chunk's share of each expert's room (times ``slack`` >= 1: more lets a chunk finish in
    # fewer rounds, the smaller chunks after it correcting the overshoot)
    quota_total = torch.ceil(torch.clamp(share * slack, max=1.0) * (level_final - start).clamp(min=0))
    flat_ids = ids.reshape(-1)
    # (expert, token) cells of an [E, n] grid, so that counts in token order per expert run
    # along contiguous rows (a cumulative sum along dim 0 of [n, E] is several times slower)
    cell = (ids * n + torch.arange(n, device=dev).unsqueeze(1)).reshape(-1)
    columns = torch.arange(c, device=dev).unsqueeze(0)
    for r in range(rounds):
        wanted = valid & ~chosen & (need.unsqueeze(1) > 0)
        limit = start + quota_total
        if r > 0:  # later rounds may go up to the chunk's own water level
            reach = torch.zeros(E, dtype=torch.int32, device=dev).scatter_add_(
                0, flat_ids, wanted.reshape(-1).int()
            ) > 0
            limit = torch.maximum(limit, water_level(load, need.sum().float(), reach))
        open_ = wanted & (load < limit)[ids]
        per_token = need.unsqueeze(1) / open_.sum(dim=1, keepdim=True).clamp(min=1)
        demand = torch.zeros_like(load).scatter_add_(0, flat_ids, (open_ * per_token).reshape(-1))
        if proposal == "least_pressure":
            key = (load + demand)[ids] + jitter
        else:  # "proportional": sample candidates with probability ~ room / expected demand
            weight = (limit - load).clamp(min=0) / demand.clamp(min=1e-6)
            key = -torch.log(jitter.clamp(min=1e-6)) / weight[ids].clamp(min=1e-9)
        key = torch.where(open_, key, torch.full_like(key, float("inf")))
        order = torch.argsort(key, dim=1, stable=True)
        propose = torch.zeros_like(open_).scatter_(1, order, columns < need.unsqueeze(1)) & open_
        proposals = torch.zeros(E * n, dtype=torch.int32, device=dev).scatter_(
            0, cell, propose.reshape(-1).int()
        ).view(E, n)
        accepted = (proposals > 0) & (
            torch.cumsum(proposals, dim=1) <= (limit - load).clamp(min=0).unsqueeze(1)
        )
        got = accepted.view(-1).gather(0, cell).view(n, c) & propose
        chosen |= got
        need = need - got.sum(dim=1)
        load = load + accepted.sum(dim=1).float()
    left = valid & ~chosen
    cand_load = torch.where(left, load[ids] + jitter, torch.full_like(jitter, float("inf")))
    order = torch.argsort(cand_load, dim=1, stable=True)  # least loaded; ties keep score order
    take = torch.zeros_like(chosen).scatter_(1, order, columns < need.unsqueeze(1)) & left
    load = load + torch.zeros_like(load).scatter_add_(0, flat_ids, take.reshape(-1).float())
    return chosen | take, load


def laser(
    logits: torch.Tensor,
    gate: GateConfig,
    params: LaserParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """LASER routing, vectorised. logits [T, E] -> Routing with exactly k experts per token.

    Tokens are assigned in geometrically shrinking chunks (``chunk_ratio`` of what is left, down
    to ``min_chunk`` tokens): each chunk sees the exact loads left by the previous ones, so the
    approximation error of a big chunk is corrected by the smaller ones after it, as the
    sequential greedy corrects itself token by token. About log(T / min_chunk) / log(1 /
    (1 - chunk_ratio)) chunks (about 20 at 8K tokens with the defaults) of ``rounds`` vectorised
    rounds each, then ``settle_rounds`` rounds of moves toward the water level and
    ``polish_rounds`` rounds of peak-lowering moves (``_refine``); no Python loop over tokens
    and no host synchronisation. That round count, not the arithmetic, is what LASER
    costs on CPU (see results/routers_cpu.md). ``load_only`` takes the closed form instead,
    ``assignment="price"`` the price assignment (``price_assign``).
    """
    ctx = ctx or RoutingContext()
    params = (params or LaserParams()).for_layer(ctx.layer)
    k, E = gate.topk, gate.num_experts
    if params.load_only:  # every pool is all experts: solved exactly in closed form
        base = torch.zeros(E, dtype=torch.float32, device=logits.device)
        if ctx.expert_load is not None:
            base = base + ctx.expert_load.to(device=logits.device, dtype=torch.float32)
        idx = load_only_indices(logits.shape[0], gate, base, ctx.ep_rank * (E // ctx.ep_size))
        every = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return _finish(logits, gate, idx, every, idx)
    vanilla_idx, flexible, pool_idx, valid, load, dist = laser_plan(logits, gate, params, ctx)
    base_load = load
    T, c = pool_idx.shape
    if c == k or T == 0:  # nothing to choose (c = k: pool_idx is vanilla_idx)
        return _finish(logits, gate, vanilla_idx, flexible, pool_idx[:, :k], dist)
    if params.assignment == "price":
        trimmed = valid if params.min_score_ratio > 0 else None  # else every candidate is valid
        chosen_idx = price_assign(pool_idx, trimmed, flexible, load, k, params.price_rounds)
        return _finish(logits, gate, vanilla_idx, flexible, chosen_idx, dist)

    need_all = torch.where(flexible, k, 0)
    pending_need = need_all.flip(0).cumsum(0).flip(0).float()  # need of tokens t.. end
    wanted_all = valid & flexible.unsqueeze(1)
    # A fixed pseudo-random offset below one token per (token, candidate) breaks ties between
    # equally loaded candidates differently for each token; without it every token of a chunk
    # would propose to the same experts (the herd the sequential greedy avoids by updating
    # loads after each token).
    jitter = _hash_unit(torch.arange(T, device=logits.device).unsqueeze(1), pool_idx)
    chosen = []
    for a, b in _chunks(T, params.chunk_ratio, params.min_chunk):
        reach = torch.zeros(E, dtype=torch.int32, device=logits.device).scatter_add_(
            0, pool_idx[a:].reshape(-1), wanted_all[a:].reshape(-1).int()
        ) > 0
        level_final = water_level(load, pending_need[a], reach)
        chunk_need = pending_need[a] - (pending_need[b] if b < T else 0.0)
        share = chunk_need / pending_need[a].clamp(min=1)
        got, load = _assign_chunk(
            pool_idx[a:b],
            valid[a:b],
            need_all[a:b],
            load,
            level_final,
            share,
            params.rounds,
            params.chunk_slack,
            params.proposal,
            jitter[a:b],
        )
        chosen.append(got)
    chosen = torch.cat(chosen)
    if params.settle_rounds or params.polish_rounds:
        demand = torch.zeros(E, dtype=torch.float32, device=logits.device).scatter_add_(
            0, pool_idx.reshape(-1), wanted_all.reshape(-1).float()
        )
        level = capped_water_level(base_load, pending_need[0], demand)
        chosen = _refine(pool_idx, wanted_all, chosen, load, level, params)
    return _finish(logits, gate, vanilla_idx, flexible, _compact(chosen, pool_idx, k), dist)


PRICE_MAX_STEP = 5.0  # cap on the Newton factor of a price update


@functools.lru_cache(maxsize=16)
def _tie_noise(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """[rows, cols] fixed negated Gumbel draws plus a constant that makes them positive. The
    same on every device (drawn on the CPU from a fixed seed, then moved); cached, as every
    call with the same shape reuses them."""
    gen = torch.Generator().manual_seed(0x1A5E)
    u = torch.rand((rows, cols), generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    # log(-log u) lies in [-27.7, 3.4] for u in [1e-12, 1 - 1e-12]: shifted to be positive, so
    # that keys (non-negative prices + noise) can use ``topk_nonnegative``
    return (torch.log(-torch.log(u)) + 28.0).float().to(device)


def price_assign(
    pool_idx: torch.Tensor,
    valid: torch.Tensor | None,
    flexible: torch.Tensor,
    base: torch.Tensor,
    k: int,
    rounds: int,
) -> torch.Tensor:
    """[T, k] experts for the flexible tokens: LASER's "price" assignment (rows of the other
    tokens are arbitrary).

    Every expert e has a price p_e; each flexible token takes the k of its valid candidates
    (``valid`` None: all) with the smallest p_e - g, g a fixed Gumbel draw per (token, pool
    column). That is sampling k candidates without replacement with weights w_e = exp(-p_e),
    so expected loads are smooth in the prices and equal prices spread tokens evenly instead
    of sending them all to the same experts.

    Targets: each expert filled to the water level L (``capped_water_level`` of the flexible
    demand: the least possible maximum when every token could take any k of its candidates),
    capped by its demand; so each expert should win the share q_e = target_e / demand_e of
    the tokens that have it as a candidate. Start: inclusion probabilities of sampling without
    replacement are close to 1 - exp(-lambda w_e) (the Poisson approximation), so w_e =
    -log(1 - q_e), p_e = -log(-log(1 - q_e)); with that start one pass already lands near
    the targets. Each further pass (``rounds`` - 1) measures the loads and moves every price
    by log(load / target) / (1 - q) (a Newton step: d log load / dp ~ -(1 - q); factor capped
    at ``PRICE_MAX_STEP``); the last pass is the answer.

    One top-k over [T, c] per pass, on keys shifted to be non-negative so that
    ``topk_nonnegative`` applies; no loop over tokens, no host synchronisation: about 15
    tensor ops per pass. Loads land within a few percent of the targets (approximation and
    sampling error), not at the level exactly as the "chunked" assignment's do.
    """
    T, c = pool_idx.shape
    noise = _tie_noise(T, c, pool_idx.device)
    weight = flexible.float()
    if valid is not None:
        noise = noise.masked_fill(~valid, float("inf"))
        per_pair = (valid & flexible.unsqueeze(1)).float()
    else:
        per_pair = weight.unsqueeze(1).expand(T, c)
    demand = torch.zeros_like(base).index_add_(0, pool_idx.reshape(-1), per_pair.reshape(-1))
    level = capped_water_level(base, weight.sum() * k, demand)
    target = torch.minimum((level - base).clamp(min=0), demand)
    share = (target / demand.clamp(min=1)).clamp(min=1e-6, max=1 - 1e-6)
    price = -torch.log(-torch.log1p(-share))
    pair_weight = weight.repeat_interleave(k)
    log_target = torch.log(target.clamp(min=0.5))

    def cheapest(price: torch.Tensor) -> torch.Tensor:  # [T, k] experts
        key = (price - price.min()).take(pool_idx) + noise  # >= 0
        return pool_idx.gather(1, topk_nonnegative(key, k, largest=False, sorted=False)[1])

    for _ in range(rounds - 1):  # correcting passes
        load = torch.zeros_like(base).index_add_(0, cheapest(price).reshape(-1), pair_weight)
        won = (load / demand.clamp(min=1)).clamp(max=1 - 1 / PRICE_MAX_STEP)
        price = price + (torch.log(load.clamp(min=0.5)) - log_target) / (1 - won)
    return cheapest(price)


REFINE_MIN_TOKENS = 1024  # the moves after the assignment consider at least this many tokens
REFINE_FRACTION = 8  # ... and at least this fraction of them


def _refine(ids, wanted, chosen, load, level, params: LaserParams) -> torch.Tensor:
    """Moves after the chunked assignment: ``settle_rounds`` toward the water level, then
    ``polish_rounds`` lowering the peak. Only the tokens with the most to gain take part (those
    whose most loaded expert exceeds their least loaded open candidate the most; an eighth of
    the tokens, at least ``REFINE_MIN_TOKENS``): a fixed-size subset, so later rounds cost a
    fraction of a full pass and nothing waits on the host."""
    T = ids.shape[0]
    size = max(REFINE_MIN_TOKENS, T // REFINE_FRACTION)
    rows = None
    if size < T:
        *_, src_load, dst_load = _proposed_moves(ids, wanted, chosen, load)
        gap = torch.nan_to_num(src_load - dst_load, nan=float("-inf"))
        rows = torch.topk(gap, size, sorted=False)[1].sort()[0]  # token order kept
        ids, wanted, full, chosen = ids[rows], wanted[rows], chosen, chosen[rows]
    chosen, load = _settle_to_level(ids, wanted, chosen, load, level, params.settle_rounds)
    chosen = _lower_the_peak(ids, wanted, chosen, load, params.polish_rounds)
    if rows is None:
        return chosen
    return full.index_copy(0, rows, chosen)


def _rank_in_group(flag: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[T] int64: each flagged token's rank among the flagged tokens of its group, in token
    order (unflagged tokens get ranks past every group's). One sort of T keys (int32 keys
    when they fit: half the sort time on CPU)."""
    T = flag.shape[0]
    token = torch.arange(T, device=flag.device)
    key = torch.where(flag, group, num_groups) * T + token
    if (num_groups + 1) * T < 2**31:
        key = key.int()
    sorted_key, order = torch.sort(key)
    sorted_group = sorted_key.long() // T
    counts = torch.bincount(sorted_group, minlength=num_groups + 1)
    first = torch.cumsum(counts, dim=0) - counts
    rank = token - first.gather(0, sorted_group)
    return torch.empty_like(rank).scatter_(0, order, rank)


def _proposed_moves(ids: torch.Tensor, wanted: torch.Tensor, chosen: torch.Tensor, load: torch.Tensor):
    """Each token's candidate move: from its most loaded chosen expert to its least loaded open
    candidate. Returns (src_col, dst_col [T] pool columns, src, dst [T] experts, src_load,
    dst_load [T]; -inf / +inf where the token has no chosen / no open candidate)."""
    cand_load = load.gather(0, ids.reshape(-1)).view(ids.shape)
    src_load, src_col = cand_load.masked_fill(~chosen, float("-inf")).max(dim=1)
    dst_load, dst_col = cand_load.masked_fill(~(wanted & ~chosen), float("inf")).min(dim=1)
    src = ids.gather(1, src_col.unsqueeze(1)).squeeze(1)
    dst = ids.gather(1, dst_col.unsqueeze(1)).squeeze(1)
    return src_col, dst_col, src, dst, src_load, dst_load


def _apply_moves(chosen, load, move, src_col, dst_col, src, dst):
    """Move the flagged tokens from pool column ``src_col`` to ``dst_col``; returns (chosen, load)."""
    flag = move.unsqueeze(1)
    chosen = chosen.scatter(1, src_col.unsqueeze(1), chosen.gather(1, src_col.unsqueeze(1)) & ~flag)
    chosen = chosen.scatter(1, dst_col.unsqueeze(1), chosen.gather(1, dst_col.unsqueeze(1)) | flag)
    moved = move.float()
    load = load + torch.zeros_like(load).scatter_add_(0, dst, moved)
    return chosen, load - torch.zeros_like(load).scatter_add_(0, src, moved)


def _settle_to_level(
    ids: torch.Tensor,
    wanted: torch.Tensor,
    chosen: torch.Tensor,
    load: torch.Tensor,
    level: torch.Tensor,
    rounds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bulk single-token moves toward the water level ``level``: up to ``rounds`` times, every
    token whose most loaded expert is above the target and whose least loaded open candidate
    is below it proposes that move; each expert gives up at most its excess over the target
    and takes at most its room below it (earlier tokens first). The target is the level for
    two rounds, then halfway between the level and the current maximum (where the level is
    out of reach). No expert crosses the target, so the maximum never rises.
    Returns (chosen, load).
    """
    E = load.shape[0]
    target = level
    for r in range(rounds):
        if r >= 2:
            target = torch.maximum(level, torch.ceil((load.max() + level) / 2))
        src_col, dst_col, src, dst, src_load, dst_load = _proposed_moves(ids, wanted, chosen, load)
        move = (src_load > target) & (dst_load < target)
        move &= _rank_in_group(move, src, E) < (load - target).clamp(min=0).gather(0, src)
        move &= _rank_in_group(move, dst, E) < (target - load).clamp(min=0).gather(0, dst)
        chosen, load = _apply_moves(chosen, load, move, src_col, dst_col, src, dst)
    return chosen, load


def _first_per_expert(flag: torch.Tensor, expert: torch.Tensor, key: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T] bool: ``flag`` kept only on the token of smallest ``key`` (unique int64) per expert."""
    big = torch.iinfo(torch.int64).max
    best = torch.full((num_experts,), big, dtype=torch.int64, device=flag.device).scatter_reduce_(
        0, expert, torch.where(flag, key, big), reduce="amin"
    )
    return flag & (best.gather(0, expert) == key)


def _lower_the_peak(
    ids: torch.Tensor, wanted: torch.Tensor, chosen: torch.Tensor, load: torch.Tensor, rounds: int
) -> torch.Tensor:
    """Single-token moves from busier to idler experts, the busiest first: up to ``rounds``
    times, every token proposes to hand its most loaded expert (load a) to its least loaded
    open candidate (load <= a - 2); each expert gives at most one token and receives at most
    one per round, the proposals from the busiest experts winning. No move lifts an expert
    past the one it relieves, so the maximum never rises, and it drops by one whenever every
    expert at the maximum finds a move. Each token keeps its number of experts, all from its
    pool.
    """
    T = ids.shape[0]
    E = load.shape[0]
    token = torch.arange(T, device=ids.device)
    for _ in range(rounds):
        src_col, dst_col, src, dst, src_load, dst_load = _proposed_moves(ids, wanted, chosen, load)
        move = dst_load <= src_load - 2
        # busiest source first, then token order (finite: a moving token has a source)
        rank = (load.max() - torch.where(move, src_load, 0)).long() * T + token
        move = _first_per_expert(move, src, rank, E)
        move = _first_per_expert(move, dst, rank, E)
        chosen, load = _apply_moves(chosen, load, move, src_col, dst_col, src, dst)
    return chosen


def laser_reference(
    logits: torch.Tensor,
    gate: GateConfig,
    params: LaserParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """The paper's sequential greedy, one token at a time: slow, for tests and benchmarks only.

    Flexible tokens in order each take the k least-loaded valid candidates (ties: better score,
    i.e. earlier in the pool), incrementing loads as they go.
    """
    ctx = ctx or RoutingContext()
    params = (params or LaserParams()).for_layer(ctx.layer)
    k = gate.topk
    vanilla_idx, flexible, pool_idx, valid, load, dist = laser_plan(logits, gate, params, ctx)
    load = load.tolist()
    pools, valids, flex = pool_idx.tolist(), valid.tolist(), flexible.tolist()
    chosen_idx = vanilla_idx.clone()
    for t in range(len(pools)):
        if not flex[t]:
            continue
        cands = [(load[e], j, e) for j, e in enumerate(pools[t]) if valids[t][j]]
        picked = sorted(cands)[:k]
        for _, _, e in picked:
            load[e] += 1
        in_pool_order = sorted(picked, key=lambda x: x[1])
        chosen_idx[t] = torch.tensor([e for _, _, e in in_pool_order])
    return _finish(logits, gate, vanilla_idx, flexible, chosen_idx, dist)

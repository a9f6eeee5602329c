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
The vectorised assignments aim at the same thing, the least possible maximum load, without a
loop over tokens or a host synchronisation:

- ``assignment="blocked"`` (the ``laser`` router, ``blocked_assign``): tokens are priced in
  geometrically shrinking blocks, each block taking its k cheapest candidates at prices set
  from the room the blocks before it left; then a few repair rounds move tokens from experts
  above the water level to candidates with room, directly or through one other expert. On
  the calibrated benchmark workloads it balances at least as well as the sequential greedy
  in every cell (results/routers_cpu.md), at 1.6-2.0x vanilla top-k's time on one CPU thread
  at 8K tokens (results/routers_cpu_1thread.md) and 2.2-2.6x with two threads, which
  vanilla's top-k uses and this assignment's few hundred small ops cannot (1.3-1.8x at 64K).
- ``assignment="price"`` (the ``laser_fast`` router, ``price_assign``): one price pass over
  all tokens: 1.2-1.7x vanilla's time at 8K tokens, loads a few percent above the level.

``load_only`` (every pool = all experts) has an exact closed form instead: water-filling to the
least possible maximum and McNaughton's wrap-around to deal the slots (``load_only_indices``).
"""

from __future__ import annotations

import functools
import threading
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
    "capped_water_level",
    "load_only_indices",
    "laser_plan",
    "LaserPlan",
    "blocked_assign",
    "price_assign",
    "block_bounds",
]


def capped_water_level(base: torch.Tensor, need: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Smallest integer L with sum_e clamp(L - base_e, 0, limit_e) >= need.

    base, limit: [E] float (integer-valued); need: 0-dim float, at most sum(limit). Returns a
    0-dim float. The sum is piecewise linear in L with breakpoints base_e and base_e + limit_e:
    it is evaluated at all 2E breakpoints at once, every segment between two breakpoints is
    solved for the level it would give, and the segment that crosses ``need`` is picked with
    a tensor index (no loop, no host synchronisation: about 25 small tensor ops).
    """
    bp = torch.sort(torch.cat([base, base + limit]))[0]
    fill = (bp.unsqueeze(1) - base).clamp_(min=0)
    fill = torch.minimum(fill, limit).sum(dim=1)  # [2E] the sum at each breakpoint
    lo, hi, fill_lo = bp[:-1], bp[1:], fill[:-1]
    # segment s = [bp_s, bp_s+1]: slope = experts filling inside it (an exact integer ratio)
    slope = (fill[1:] - fill_lo) / (hi - lo).clamp_(min=1)
    inside = torch.minimum(lo + ((need - fill_lo) / slope.clamp_(min=1)).ceil_(), hi)
    first = (fill < need).sum().clamp_(max=bp.numel() - 1)  # first breakpoint reaching need
    # first = 0: need <= 0, the lowest breakpoint; else the level inside segment first - 1
    return torch.cat([bp[:1], inside]).take(first)


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


TIE_SEED = 0x1A5E  # the pricing passes' tie noise
REPAIR_SEED = 0x5EED  # the repair rounds' choices
_NOISE: dict[tuple, torch.Tensor] = {}
_NOISE_LOCK = threading.Lock()


def _fixed_noise(rows: int, cols: int, device: torch.device, seed: int) -> torch.Tensor:
    """[rows, cols] fixed negated Gumbel draws shifted to be positive (in [0.3, 31.4]).

    Drawn on the CPU from ``seed`` in row-major order and moved to ``device``: the same values
    on every device, and row t is the same whatever ``rows`` a call asks for (a table grown on
    demand and sliced), so batches of different sizes share one table per (cols, device).
    """
    key = (seed, cols, str(device))
    table = _NOISE.get(key)
    if table is None or table.shape[0] < rows:
        with _NOISE_LOCK:
            table = _NOISE.get(key)
            if table is None or table.shape[0] < rows:
                n = max(rows, 1024, 2 * (0 if table is None else table.shape[0]))
                gen = torch.Generator().manual_seed(seed)
                u = torch.rand((n, cols), generator=gen, dtype=torch.float64)
                u = u.clamp(1e-12, 1 - 1e-12)
                # log(-log u) lies in [-27.7, 3.4]: shifted to be positive, so that keys
                # (non-negative prices + noise) can use the int32 view of the floats
                table = (torch.log(-torch.log(u)) + 28.0).float().to(device)
                _NOISE[key] = table
    return table[:rows]


def _finish(logits, gate, vanilla_idx, flexible, chosen_idx, dist=None) -> Routing:
    idx = torch.where(flexible.unsqueeze(1), chosen_idx, vanilla_idx)
    probs, routing_map = routing_from_indices(
        idx, gate_weights(logits, idx, gate, dist), gate.num_experts, like=logits
    )
    zero = torch.zeros((), dtype=torch.int64, device=logits.device)
    return Routing(probs, routing_map, num_dropped=zero)


PRICE_SHIFT = 34.7  # keeps every key >= 0 and the "must take" experts below all others
PRICE_BINS = 1 << 16  # resolution of the price table in the share q (``_price_table``)
REPAIR_FRACTION = 8  # each repair round moves tokens of 1 / REPAIR_FRACTION of the batch ...
REPAIR_MIN_TOKENS = 256  # ... and of at least this many
_INF = float("inf")
_TABLES: dict[str, torch.Tensor] = {}


def block_bounds(num_tokens: int, ratio: float, min_block: int) -> list[tuple[int, int]]:
    """Token ranges priced one after another: each takes ``ratio`` of the tokens left (at least
    ``min_block``; the last takes all that is left once at most ``min_block`` remain)."""
    bounds, start = [], 0
    while start < num_tokens:
        left = num_tokens - start
        size = left if left <= min_block else max(min_block, int(left * ratio))
        bounds.append((start, start + size))
        start += size
    return bounds


@functools.lru_cache(maxsize=64)
def _block_layout(
    num_tokens: int, ratio: float, min_block: int, num_experts: int, device: torch.device
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """``block_bounds`` and, per token, the offset of its block's row in the demand counts
    [T, 1] int64: block i of n counts in row n - 1 - i, so that a cumulative sum over the rows
    gives the demand of blocks i, i + 1, ... Cached per batch shape (no host-to-device copy
    per call)."""
    bounds = block_bounds(num_tokens, ratio, min_block)
    n = len(bounds)
    sizes = torch.tensor([b - a for a, b in bounds])
    offsets = torch.repeat_interleave((n - 1 - torch.arange(n)) * num_experts, sizes)
    return bounds, offsets.unsqueeze(1).to(device)


def _price_table(device: torch.device) -> torch.Tensor:
    """[PRICE_BINS + 1] fp32: the price of an expert whose share of the demand still to come
    is q = i / PRICE_BINS (its room / its demand; ``_prices`` rounds to the nearest bin).

    Sampling k of c candidates without replacement with weights w_e = exp(-price_e) includes
    an expert with probability close to 1 - exp(-lambda w_e) (the Poisson approximation), so
    the share q of the tokens listing e that should take it gives price = -log(-log(1 - q)),
    shifted by PRICE_SHIFT. Bin 0 (no room) is the price at q = 1e-6; the last bin (room
    for every token listing e: all must take it) is 0, below every other key. Computed once
    per device in float64; one table lookup replaces the transcendental ops per block.
    """
    key = str(device)
    table = _TABLES.get(key)
    if table is None:
        q = torch.arange(PRICE_BINS + 1, dtype=torch.float64) / PRICE_BINS
        q = q.clamp(1e-6, 1 - 1e-6)
        table = PRICE_SHIFT - torch.log(-torch.log1p(-q))
        table[PRICE_BINS] = 0.0
        table = table.float().to(device)
        _TABLES[key] = table
    return table


def _prices(
    room: torch.Tensor, bins_per_room: torch.Tensor, table: torch.Tensor, half: torch.Tensor
) -> torch.Tensor:
    """[E] prices (>= 0) under which a block's tokens, each taking its k cheapest candidates
    with Gumbel tie noise, fill each expert's ``room`` in expectation: the table price of the
    share q = room / demand (``bins_per_room`` = PRICE_BINS / demand, ``_price_table``).
    Room and demand are integers, so q rounds to the last bin exactly when room >= demand
    (for demands up to 2 PRICE_BINS). Experts without room all get the q = 1e-6 price, plus 1
    per token over the cap, so that a token that must take some of them takes the least
    loaded, as the greedy would.
    """
    bins = torch.addcmul(half, room, bins_per_room).clamp_(0, PRICE_BINS).long()
    return table.take(bins).sub_(room.clamp(max=0))


def blocked_assign(
    pool_idx: torch.Tensor,
    valid: torch.Tensor | None,
    flexible: torch.Tensor,
    base: torch.Tensor,
    k: int,
    block_ratio: float = 0.4,
    min_block: int = 32,
    repair_rounds: int = 2,
) -> torch.Tensor:
    """[T, k] experts for the flexible tokens (rows of the others are arbitrary): LASER's
    least-loaded assignment, vectorised.

    Target: every expert at most at ``cap`` = min(L, base + demand), L the water level of the
    flexible demand (``capped_water_level``: the least possible maximum if every token could
    take any k of its candidates) and demand the flexible tokens listing the expert.

    1. Pricing in blocks (``block_bounds``): for each block in turn, prices from the room
       (cap - load) the earlier blocks left and the demand still to come (``_prices``); each
       token sorts its candidates by price + its fixed Gumbel draw (``_fixed_noise``) and takes
       the first k. A block's sampling error is corrected by the smaller blocks after it, so
       the loads end within a few tokens of the caps.
    2. Repair (``_repair``, ``repair_rounds`` rounds): moves from experts above their cap to
       candidates with room, directly or through one intermediate expert, or, where no room
       is in reach, from the peak to any expert below it; no move raises the maximum load.

    ``valid`` [T, c] bool (None: all): candidates kept by ``min_score_ratio``; the others are
    never taken. About 15 tensor ops per block and 100 per repair round; no loop over tokens,
    no host synchronisation.
    """
    T, c = pool_idx.shape
    E = base.numel()
    dev = pool_idx.device
    noise = _fixed_noise(T, c, dev, TIE_SEED)
    bounds, offsets = _block_layout(T, block_ratio, min_block, E, dev)
    n = len(bounds)
    # demand[n - 1 - i]: flexible (token, valid candidate) pairs per expert in blocks i, i + 1,
    # ...; the other tokens count in a last row that is dropped
    keys = (pool_idx + torch.where(flexible.unsqueeze(1), offsets, n * E)).view(-1)
    if valid is None:
        counts = torch.bincount(keys, minlength=(n + 1) * E)
    else:
        counts = torch.bincount(keys, valid.view(-1).float(), minlength=(n + 1) * E)
        noise = noise.masked_fill(~valid, 1e4)  # sorted after every valid candidate
    demand = counts[: n * E].view(n, E).cumsum(0).float()
    level = capped_water_level(base, flexible.sum().float() * k, demand[-1])
    room = torch.minimum(level - base, demand[-1])  # cap - load
    cap = base + room
    bins_per_room = (PRICE_BINS / demand.clamp_(min=1)).unbind(0)[::-1]
    table, half = _price_table(dev), torch.full((), 0.5, device=dev)
    taken = (-flexible.float()).repeat_interleave(k)  # the first k of every flexible row count
    sizes = [b - a for a, b in bounds]
    sel = torch.empty_like(pool_idx)  # per row: candidates in price order, the first k taken
    for (a, b), pool_b, noise_b, sel_b, bins_b in zip(
        bounds, pool_idx.split(sizes), noise.split(sizes), sel.split(sizes), bins_per_room
    ):
        price = _prices(room, bins_b, table, half)
        order = torch.sort(price.take(pool_b).add_(noise_b).view(torch.int32), dim=1)[1]
        torch.gather(pool_b, 1, order, out=sel_b)
        room.index_add_(0, sel_b[:, :k].reshape(-1), taken[a * k:b * k])
    if repair_rounds and c > k:
        _repair(sel, valid, flexible, cap - room, cap, k, repair_rounds)
    return sel[:, :k]


def _ranks_in_groups(
    flag: torch.Tensor,
    group_a: torch.Tensor,
    group_b: torch.Tensor,
    num_groups: int,
    cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] int32 each: for flagged entries, 1 + the number of flagged entries before them with
    the same ``group_a`` (first) and with the same ``group_b`` (second): one cumulative count
    along contiguous [2 groups, n] rows (int32: a third of the float cumsum's time on CPU)."""
    counts = torch.zeros(2 * num_groups, flag.shape[0], dtype=torch.int32, device=flag.device)
    f = flag.int()
    counts.index_put_((group_a, cols), f)
    counts.index_put_((group_b + num_groups, cols), f)
    counts.cumsum_(1)
    rank_a = counts.gather(0, group_a.unsqueeze(0)).squeeze_(0)
    return rank_a, counts.gather(0, (group_b + num_groups).unsqueeze(0)).squeeze_(0)


CHAIN_LOG_WEIGHT = 0.0  # log-weight of passing excess on to an expert one move from room
PEAK_LOG_WEIGHT = 0.0  # log-weight of a move that only lowers the peak


def _repair(
    sel: torch.Tensor,
    valid: torch.Tensor | None,
    flexible: torch.Tensor,
    load: torch.Tensor,
    cap: torch.Tensor,
    k: int,
    rounds: int,
) -> None:
    """Repair rounds on ``sel`` [T, c] (in place; per row the first k are taken, the rest not).

    Each round takes a strided 1 / REPAIR_FRACTION of the tokens (at least REPAIR_MIN_TOKENS).
    Experts with room (load < cap) are at distance 0, experts one move from room at distance 1
    and two moves at distance 2, a move being a (taken, untaken) pair of some token of the
    first round's sample. Every sampled token proposes one move, from one of its taken experts
    above its cap, drawn with weight = the excess, to one of its untaken candidates:
    - a source at distance 1 moves to an expert with room (drawn with weight = the room);
    - a source at distance 2 moves to room or to an expert at distance 1, which passes the
      excess on in a later round;
    - a source at the peak (the maximum load) that cannot reach room moves to any expert at
      least 2 below the peak (the level L can be out of reach of the pools: then the excess
      spreads as the greedy's would instead of staying on a few experts).
    A move is accepted if, counting the proposals in token order, it is within the
    destination's room (for an expert without room: keeps it below the peak) and within the
    source's excess. So no move raises the maximum load.
    """
    T, c = sel.shape
    E = load.numel()
    dev = sel.device
    n = min(T, max(REPAIR_MIN_TOKENS, T // REPAIR_FRACTION))
    stride = max(1, T // n)
    noise = _fixed_noise(rounds * n, c, dev, REPAIR_SEED).view(rounds, n, c)
    cols = torch.arange(n, device=dev)
    reach = None
    for r in range(rounds):
        start = r % stride
        S = sel[start::stride][:n]  # a view: moves are written into ``sel``
        movable = flexible[start::stride][:n]
        taken, untaken = S[:, :k], S[:, k:]
        over = load - cap
        x = over.clamp(min=0)  # excess
        y = x - over  # room
        if reach is None:  # [E, E]: 1 where a sampled token could move e -> f
            m = min(k, c - k)  # aligned (taken, untaken) column pairs
            pairs = (taken[:, k - m:] * E + untaken[:, :m]).view(-1)
            weight = movable.float().repeat_interleave(m)
            reach = torch.bincount(pairs, weight, minlength=E * E).view(E, E).clamp_(max=1)
        room = y > 0
        near = (reach @ room.float() > 0) & ~room  # distance 1
        far = (reach @ near.float() > 0) & ~room & ~near  # distance 2
        log_room = y.log()  # -inf without room
        peak = load.max()
        below = load <= peak - 2  # can take one more and stay below the peak
        # destination weights for a source at distance 1 (row 0), 2 (row 1), or at the peak
        # with no way to room (row 2: any expert below the peak)
        dst_w = torch.stack([
            log_room,
            log_room.masked_fill(near, CHAIN_LOG_WEIGHT),
            torch.where(below, PEAK_LOG_WEIGHT, -_INF),
        ])
        reach_room = near | far
        src_w = x.log().masked_fill_(~(reach_room | (load == peak)), -_INF)
        src_key, src_col = (src_w.take(taken) + noise[r, :, :k]).max(1)
        src_col = src_col.unsqueeze_(1)
        a = taken.gather(1, src_col)
        row = (far.long() + 2 * (~reach_room).long()).mul_(E).take(a)  # the source's row
        dst_key = dst_w.view(-1).take(untaken + row).add_(noise[r, :, k:])
        if valid is not None:  # untaken candidates must have been kept by min_score_ratio
            dst_key.masked_fill_(~valid[start::stride][:n, k:], -_INF)
        dst_key, dst_col = dst_key.max(1)
        dst_col = dst_col.unsqueeze_(1).add_(k)
        b = S.gather(1, dst_col)
        a, b = a.squeeze_(1), b.squeeze_(1)
        ok = (src_key + dst_key > -_INF) & movable
        quota = torch.where(room, y, (peak - 1 - load).clamp_(min=0))
        rank_b, rank_a = _ranks_in_groups(ok, b, a, E, cols)
        ok &= (rank_b <= quota.take(b)) & (rank_a <= x.take(a))
        S.scatter_(1, src_col, torch.where(ok, b, a).unsqueeze_(1))
        S.scatter_(1, dst_col, torch.where(ok, a, b).unsqueeze_(1))
        moved = ok.float()
        load = load.index_add(0, b, moved).index_add_(0, a, moved, alpha=-1)


def laser(
    logits: torch.Tensor,
    gate: GateConfig,
    params: LaserParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """LASER routing, vectorised. logits [T, E] -> Routing with exactly k experts per token.

    ``laser_plan`` (shape test, pools, starting loads), then the assignment
    ``params.assignment`` names (``blocked_assign`` or ``price_assign``); ``load_only`` takes
    the closed form (``load_only_indices``).
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
    T, c = pool_idx.shape
    if c == k or T == 0:  # nothing to choose (c = k: pool_idx is vanilla_idx)
        return _finish(logits, gate, vanilla_idx, flexible, pool_idx[:, :k], dist)
    trimmed = valid if params.min_score_ratio > 0 else None  # else every candidate is valid
    # the assignment only moves indices: no autograd bookkeeping (version counters, views) for
    # its few hundred small ops; its [T, k] result is an index, never saved for backward
    with torch.inference_mode():
        if params.assignment == "price":
            chosen_idx = price_assign(pool_idx, trimmed, flexible, load, k, params.price_rounds)
        else:
            chosen_idx = blocked_assign(
                pool_idx, trimmed, flexible, load, k,
                params.block_ratio, params.min_block, params.repair_rounds,
            )
    return _finish(logits, gate, vanilla_idx, flexible, chosen_idx, dist)


PRICE_MAX_STEP = 5.0  # cap on the Newton factor of a price update


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
    sampling error); the "blocked" assignment (``blocked_assign``) goes on to the level.
    """
    T, c = pool_idx.shape
    noise = _fixed_noise(T, c, pool_idx.device, TIE_SEED)
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

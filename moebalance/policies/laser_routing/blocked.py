"""LASER's "blocked" assignment (the ``laser`` router): pricing in shrinking blocks, then
repair rounds toward the water level.

Tokens are priced in geometrically shrinking blocks (``block_bounds``), each block taking its
k cheapest candidates at prices set from the room the blocks before it left (``_prices``, a
table lookup: ``_price_table``); then a few repair rounds (``_repair``) move tokens from
experts above the water level to candidates with room, directly or through one other expert.
"""

from __future__ import annotations

import functools

import torch

from .noise import REPAIR_SEED, TIE_SEED, fixed_noise
from .water_level import capped_water_level

__all__ = ["blocked_assign", "block_bounds"]

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
       token sorts its candidates by price + its fixed Gumbel draw (``fixed_noise``) and takes
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
    noise = fixed_noise(T, c, dev, TIE_SEED)
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
    noise = fixed_noise(rounds * n, c, dev, REPAIR_SEED).view(rounds, n, c)
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
        # log destination weights for a source at distance 1 (row 0: the room), 2 (row 1: the
        # room, or 1 for an expert at distance 1), or at the peak with no way to room (row 2:
        # 1 for any expert below the peak)
        dst_w = torch.stack([
            log_room,
            log_room.masked_fill(near, 0.0),
            torch.where(below, 0.0, -_INF),
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

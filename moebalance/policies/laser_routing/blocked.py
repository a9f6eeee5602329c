"""LASER's "blocked" assignment (the ``laser`` router): Hall levels, pricing in shrinking
blocks, then augmenting rounds to the least possible peak.

Per-expert targets and a lower bound on the peak come from the pools (``hall_levels``); tokens
are priced in geometrically shrinking blocks (``block_bounds``), each block taking its k
cheapest candidates, lower-level experts first, at prices set from the room the blocks
before it left (``_prices``, a table lookup: ``_price_table``); then augmenting rounds
(``refine_assignment``) move the excess above the bound along paths of token moves.
"""

from __future__ import annotations

import functools

import torch

from .indexing import pick
from .levels import hall_levels
from .noise import TIE_SEED, fixed_noise
from .refine import REFINE_PAIRS, refine_assignment
from .water_level import capped_water_level

__all__ = ["blocked_assign", "block_bounds"]

PRICE_SHIFT = 34.7  # keeps every key >= 0 and the "must take" experts below all others
PRICE_BINS = 1 << 16  # resolution of the price table in the share q (``_price_table``)
LEVEL_STEP = 100.0  # key offset per Hall level: above any price plus tie noise (< 80)
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
    with torch.inference_mode(False):  # cached: a normal tensor whoever asks first
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
        with torch.inference_mode(False):  # cached: a normal tensor whoever asks first
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
    return pick(table, bins).sub_(room.clamp(max=0))


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
    least-loaded assignment, vectorised, aiming at the least possible peak load.

    1. Targets (``hall_levels``): each expert's level from the load that the tokens listing
       it cannot place elsewhere, and a lower bound on the peak of any assignment (with the
       water level ``capped_water_level``: the flexible demand spread as evenly as the pools
       allow).
    2. Pricing in blocks (``block_bounds``): for each block in turn, prices from the room
       (target - load) the earlier blocks left and the demand still to come (``_prices``);
       each token sorts its candidates by level, lowest first, then by price + its fixed
       Gumbel draw (``fixed_noise``), and takes the first k. A block's sampling error is
       corrected by the smaller blocks after it. When tokens have few possible moves
       (k (c - k) <= REFINE_PAIRS) the demand counts only each token's choices at its
       boundary level, and the room only what its sure takes leave.
    3. Augmenting rounds (``refine_assignment``, ``repair_rounds`` rounds): the excess above
       the bound moves along paths of token moves to experts with room; no move raises the
       peak.

    ``valid`` [T, c] bool (None: all): candidates kept by ``min_score_ratio``; the others are
    never taken. About 15 tensor ops per block, 40 for the targets and 70 per push step of
    the rounds; no loop over tokens, no host synchronisation.
    """
    T, c = pool_idx.shape
    E = base.numel()
    dev = pool_idx.device
    noise = fixed_noise(T, c, dev, TIE_SEED)
    bounds, offsets = _block_layout(T, block_ratio, min_block, E, dev)
    n = len(bounds)
    # left[n - 1 - i]: flexible (token, valid candidate) pairs per expert in blocks i, i + 1,
    # ...; the other tokens count in a last row that is dropped
    keys = (pool_idx + torch.where(flexible.unsqueeze(1), offsets, n * E)).view(-1)
    if valid is None:
        counts = torch.bincount(keys, minlength=(n + 1) * E)
        num_valid = None
    else:
        counts = torch.bincount(keys, valid.view(-1).float(), minlength=(n + 1) * E)
        noise = noise.masked_fill(~valid, _INF)  # sorted after every valid candidate
        num_valid = valid.sum(1, keepdim=True)
    left = counts[: n * E].view(n, E).cumsum(0).float()
    demand = left[-1].clone()  # flexible tokens listing each expert
    water = capped_water_level(base, flexible.sum().float() * k, demand)
    # few possible moves per token (k (c - k) small): the pools' forced structure decides the
    # balance, and the prices must count only the choices each token has at its boundary
    # level (tokens avoiding an expert do not compete for it; those below take it for sure)
    choices = k * (c - k) <= REFINE_PAIRS
    hall = hall_levels(pool_idx, valid, flexible, base, k, demand, choices)
    bound = torch.maximum(hall.bound, water)
    cap = torch.minimum(hall.target, base + demand)
    room = cap - base  # cap - load
    sure_left = [None] * n
    if choices:
        sure = (hall.relative < 0).view(-1)
        counted = hall.relative <= 0 if valid is None else (hall.relative <= 0) & valid
        counts = torch.bincount(keys + sure * ((n + 1) * E), counted.view(-1).float(),
                                minlength=2 * (n + 1) * E)
        left = counts[: n * E].view(n, E).cumsum(0).float()
        sure_left = counts[(n + 1) * E: (2 * n + 1) * E].view(n, E).cumsum(0).unbind(0)[::-1]
    bins_per_room = (PRICE_BINS / left.clamp_(min=1)).unbind(0)[::-1]
    table, half = _price_table(dev), torch.full((), 0.5, device=dev)
    step = hall.level * LEVEL_STEP
    taken = (-flexible.float()).repeat_interleave(k)  # the first k of every flexible row count
    sizes = [b - a for a, b in bounds]
    sel = torch.empty_like(pool_idx)  # per row: candidates in key order, the first k taken
    for (a, b), pool_b, noise_b, sel_b, bins_b, sure_b in zip(
        bounds, pool_idx.split(sizes), noise.split(sizes), sel.split(sizes), bins_per_room,
        sure_left,
    ):
        free = room if sure_b is None else room - sure_b  # the room the choices compete for
        price = _prices(free, bins_b, table, half).add_(step)
        order = torch.sort(pick(price, pool_b).add_(noise_b).view(torch.int32), dim=1)[1]
        torch.gather(pool_b, 1, order, out=sel_b)
        room.index_add_(0, sel_b[:, :k].reshape(-1), taken[a * k:b * k])
    refine_assignment(sel, num_valid, flexible, base, cap - room, bound, demand, k, repair_rounds)
    return sel[:, :k]

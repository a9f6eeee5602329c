"""LASER's "price" assignment (the ``laser_fast`` router): one top-k over the pools at prices
set from the water level, optionally corrected by Newton passes."""

from __future__ import annotations

import torch

from ..gate import topk_nonnegative
from .noise import TIE_SEED, fixed_noise
from .water_level import capped_water_level

__all__ = ["price_assign"]

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
    noise = fixed_noise(T, c, pool_idx.device, TIE_SEED)
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

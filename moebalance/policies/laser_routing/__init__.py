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

The paper's assignment is sequential over tokens (``tests/laser_reference.py`` keeps it for the
tests and the benchmark); it is not optimal. For fixed pools the least possible peak is a
min-max b-matching, which ``moebalance.assignment_optimum`` solves exactly by max-flow for the
tests and the benchmark. The vectorised assignments aim at it without a loop over tokens or a
host synchronisation:

- ``assignment="blocked"`` (the ``laser`` router, ``blocked_assign``): per-expert targets and a
  lower bound on the peak from the forced structure of the pools (``hall_levels``), tokens
  priced in geometrically shrinking blocks toward the targets, then augmenting rounds
  (``refine_assignment``) that move the excess above the bound along paths of token moves.
  When they drain it the peak is the least possible; ``results/routers_cpu_1thread.md``
  gives the gap to the exact optimum per benchmark cell.
- ``assignment="price"`` (the ``laser_fast`` router, ``price_assign``): one price pass over all
  tokens, far fewer ops; loads land a few percent above the water level (its gap to the
  optimum per cell is in the same table).

``load_only`` (every pool = all experts) has an exact closed form instead: water-filling to the
least possible maximum and McNaughton's wrap-around to deal the slots (``load_only_indices``).

Modules, one job each: ``plan`` (shape test, pools, starting loads, the final Routing),
``water_level`` (the water level and the load-only closed form), ``levels`` (Hall levels: the
targets and bound of the blocked assignment), ``blocked`` (its pricing), ``refine`` (its
augmenting rounds), ``price`` (the price assignment), ``noise`` (their fixed tie noise).
"""

from __future__ import annotations

import torch

from ...config import GateConfig, LaserParams, RoutingContext
from ...routing import Routing
from .blocked import block_bounds, blocked_assign
from .levels import HallLevels, hall_levels
from .plan import LaserPlan, finish_routing, laser_plan
from .price import price_assign
from .refine import refine_assignment, refine_schedule
from .water_level import capped_water_level, layout_tie_order, load_only_indices

__all__ = [
    "laser",
    "capped_water_level",
    "load_only_indices",
    "layout_tie_order",
    "laser_plan",
    "LaserPlan",
    "finish_routing",
    "blocked_assign",
    "price_assign",
    "block_bounds",
    "hall_levels",
    "HallLevels",
    "refine_assignment",
    "refine_schedule",
]


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
        if ctx.expert_group is None:  # contiguous: ties from this rank's first expert onwards
            idx = load_only_indices(logits.shape[0], gate, base, ctx.ep_rank * (E // ctx.ep_size))
        else:
            ties = layout_tie_order(ctx.local_experts, ctx.expert_group, ctx.ep_rank, ctx.ep_size)
            idx = load_only_indices(logits.shape[0], gate, base, tie_order=ties)
        every = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return finish_routing(logits, gate, idx, every, idx)
    vanilla_idx, flexible, pool_idx, valid, load, dist = laser_plan(logits, gate, params, ctx)
    T, c = pool_idx.shape
    if c == k or T == 0:  # nothing to choose (c = k: pool_idx is vanilla_idx)
        return finish_routing(logits, gate, vanilla_idx, flexible, pool_idx[:, :k], dist)
    trimmed = valid if params.min_score_ratio > 0 else None  # else every candidate is valid
    # the assignment only moves indices: no autograd bookkeeping (version counters, views) for
    # its few hundred small ops; its [T, k] result is an index, never saved for backward.
    # torch.compile cannot trace inference mode: plain no_grad there
    quiet = torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()
    with quiet:
        if params.assignment == "price":
            chosen_idx = price_assign(pool_idx, trimmed, flexible, load, k, params.price_rounds)
        else:
            chosen_idx = blocked_assign(
                pool_idx, trimmed, flexible, load, k,
                params.block_ratio, params.min_block, params.repair_rounds,
            )
    return finish_routing(logits, gate, vanilla_idx, flexible, chosen_idx, dist)

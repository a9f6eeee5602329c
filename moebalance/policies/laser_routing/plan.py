"""LASER's shared first half: the shape test, the candidate pools and the starting loads
(``laser_plan``), and the Routing of a decision (``finish_routing``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...config import GateConfig, LaserParams, RoutingContext
from ...routing import Routing, routing_from_indices
from ..gate import gate_weights, score_distribution, select_topk, selection_scores, topk_nonnegative

__all__ = ["LaserPlan", "laser_plan", "finish_routing"]


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


def finish_routing(logits, gate, vanilla_idx, flexible, chosen_idx, dist=None) -> Routing:
    """The Routing of a LASER decision: skewed tokens keep ``vanilla_idx`` [T, k], flexible
    ones (``flexible`` [T] bool) take ``chosen_idx`` [T, k]; the weights are the gate's own at
    the chosen experts (``gate_weights``; ``dist``: the score distribution, if computed)."""
    idx = torch.where(flexible.unsqueeze(1), chosen_idx, vanilla_idx)
    probs, routing_map = routing_from_indices(
        idx, gate_weights(logits, idx, gate, dist), gate.num_experts, like=logits
    )
    zero = torch.zeros((), dtype=torch.int64, device=logits.device)
    return Routing(probs, routing_map, num_dropped=zero)

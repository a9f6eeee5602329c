"""Capacity-aware token drop and expanded drop (He, Cai, Huang, Li; arXiv 2503.05066).

Both act on one EP rank's local tokens before the all-to-all (no extra communication), with
capacity C = ceil(gamma * T * k / E) from the local token count T (the paper's official code uses
ceil; its Algorithm 1 uses int()).
"""

from __future__ import annotations

import math

import torch

from ..config import ExpandedDropParams, GateConfig, RoutingContext, TokenDropParams
from ..routing import Routing
from .gate import score_distribution
from .topk_routing import topk

__all__ = ["expert_capacity", "keep_top_per_group", "token_drop", "expanded_drop"]


def expert_capacity(num_tokens: int, gate: GateConfig, capacity_factor: float) -> int:
    """C = ceil(gamma * T * k / E): tokens each expert may keep (T = local tokens)."""
    return math.ceil(capacity_factor * num_tokens * gate.topk / gate.num_experts)


def _ordered_keys(priority: torch.Tensor) -> torch.Tensor:
    """[G, N] float -> [G, N] int64 keys in the same order, all distinct: the float's bits made
    monotone in the high 32 bits, ties broken by position (earlier entries rank higher)."""
    bits = priority.float().contiguous().view(torch.int32).to(torch.int64)
    monotone = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    n = priority.shape[-1]
    position = torch.arange(n - 1, -1, -1, device=priority.device, dtype=torch.int64)
    return monotone * (1 << 32) + position


def keep_top_per_group(priority: torch.Tensor, group_size: int, capacity: int) -> torch.Tensor:
    """[T, E] bool: in each group of ``group_size`` adjacent expert columns, the ``capacity``
    (token, expert) entries of highest ``priority`` among the finite ones.

    priority: [T, E] float, -inf where the pair is not a candidate. Ties go to the earlier token,
    so no group ever keeps more than ``capacity`` entries. One ``kthvalue`` per group on distinct
    integer keys: no sort, no host synchronisation.
    """
    T, E = priority.shape
    G = E // group_size
    flat = priority.view(T, G, group_size).permute(1, 0, 2).reshape(G, T * group_size)
    candidate = torch.isfinite(flat)
    n = T * group_size
    if capacity >= n:
        keep = candidate
    elif capacity == 0:
        keep = torch.zeros_like(candidate)
    else:
        keys = _ordered_keys(flat)
        threshold = torch.kthvalue(keys, n - capacity + 1, dim=1, keepdim=True)[0]
        keep = (keys >= threshold) & candidate
    return keep.view(G, T, group_size).permute(1, 0, 2).reshape(T, E)


def _priority(
    scores: torch.Tensor, candidates: torch.Tensor, policy: str, seed: int
) -> torch.Tensor:
    """[T, E] float priority for the drop policy, -inf off ``candidates``."""
    T = scores.shape[0]
    if policy == "score":
        pri = scores
    elif policy in ("order", "reverse"):
        pos = torch.arange(T, device=scores.device, dtype=torch.float32)
        pri = (-pos if policy == "order" else pos).unsqueeze(1).expand_as(scores)
    else:  # random
        gen = torch.Generator(device=scores.device).manual_seed(seed)
        pri = torch.rand(scores.shape, generator=gen, device=scores.device)
    return torch.where(candidates, pri, torch.full_like(pri, float("-inf")))


def token_drop(
    logits: torch.Tensor,
    gate: GateConfig,
    params: TokenDropParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """Capacity-aware token drop. logits [T, E] -> Routing with at most k experts per token.

    Routes vanilla top-k, then for every expert (``scope="expert"``) or every EP rank's experts
    together (``scope="device"``) over capacity keeps the top entries by the drop policy and drops
    the rest. Kept weights are the vanilla ones (or rescaled to the token's original sum when
    ``renormalize``). Tokens that lose every expert pass through the residual only.
    """
    ctx = ctx or RoutingContext()
    params = params or TokenDropParams()
    base = topk(logits, gate, None, ctx)
    if params.prefill_only and ctx.decode:
        return base
    T, E = base.routing_map.shape
    capacity = expert_capacity(T, gate, params.capacity_factor)
    group = 1
    if params.scope == "device":
        group = E // ctx.ep_size
        group_capacity = math.ceil(group * params.capacity_factor * T * gate.topk / E)
    else:
        group_capacity = capacity
    pri = _priority(score_distribution(logits, gate), base.routing_map, params.drop_policy, ctx.seed)
    keep = keep_top_per_group(pri, group, group_capacity)
    probs = base.probs * keep
    if params.renormalize:
        before = base.probs.sum(dim=1, keepdim=True)
        after = probs.sum(dim=1, keepdim=True)
        probs = probs * torch.where(after > 0, before / after, torch.zeros_like(after))
    return Routing(
        probs,
        keep,
        capacity=capacity if params.scope == "expert" else None,
        num_dropped=(base.routing_map & ~keep).sum(),
    )


def expanded_drop(
    logits: torch.Tensor,
    gate: GateConfig,
    params: ExpandedDropParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """Capacity-aware expanded drop. logits [T, E] -> Routing (a token may get more than k).

    Candidates: each token's top-k plus every expert hosted on this EP rank
    (experts [rank * E/EP, (rank + 1) * E/EP)). Each expert keeps its C best candidates by score
    S[t, e]; optionally each token then keeps at most ``max_experts_per_token``. Weights are the
    scores S of the kept experts, renormalised per token when ``renormalize``. With EP = 1 every
    expert is local: expert-choice routing with capacity C.
    """
    ctx = ctx or RoutingContext()
    params = params or ExpandedDropParams()
    base = topk(logits, gate, None, ctx)
    if params.prefill_only and ctx.decode:
        return base
    T, E = base.routing_map.shape
    per_rank = E // ctx.ep_size
    local = torch.zeros(E, dtype=torch.bool, device=logits.device)
    local[ctx.ep_rank * per_rank : (ctx.ep_rank + 1) * per_rank] = True
    candidates = base.routing_map | local.unsqueeze(0)
    scores = score_distribution(logits, gate)
    capacity = expert_capacity(T, gate, params.capacity_factor)
    pri = _priority(scores, candidates, "score", ctx.seed)
    keep = keep_top_per_group(pri, 1, capacity)
    m = params.max_experts_per_token
    if m is not None and m < E:
        row_pri = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
        top = torch.topk(row_pri, m, dim=1, sorted=False)[1]
        keep = keep & torch.zeros_like(keep).scatter_(1, top, True)
    weights = scores * keep
    if params.renormalize:
        total = weights.sum(dim=1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    if gate.scaling_factor:
        weights = weights * gate.scaling_factor
    return Routing(
        weights.to(logits.dtype),
        keep,
        capacity=capacity,
        num_dropped=(base.routing_map & ~keep).sum(),
    )

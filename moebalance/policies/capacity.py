"""Capacity-aware token drop and expanded drop (He, Cai, Huang, Li; arXiv 2503.05066).

Both act on one EP rank's local tokens before the all-to-all (no extra communication), with
capacity C = ceil(gamma * T * k / E) from the local token count T (the paper's official code uses
ceil; its Algorithm 1 uses int()).
"""

from __future__ import annotations

import math

import torch

from ..config import ExpandedDropParams, GateConfig, RoutingContext, TokenDropParams
from ..routing import Routing, routing_from_indices
from .gate import gate_weights, score_distribution
from .topk_routing import topk_indices

__all__ = [
    "expert_capacity",
    "keep_top_per_group",
    "keep_top_per_expert_group",
    "keep_top_per_column",
    "token_drop",
    "expanded_drop",
]


def _masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, values, 0.0)`` for fp32 ``values``, bit for bit: the float bits
    ANDed with 0 or all ones. Neither a product (the tiny, subnormal scores of a peaked softmax
    take the slow path on x86 CPUs) nor ``where`` on a bool mask (a slower kernel on CPU).
    Values that autograd tracks take ``where``: bit operations have no gradient."""
    if values.dtype != torch.float32 or (values.requires_grad and torch.is_grad_enabled()):
        return torch.where(keep, values, 0.0)
    return (values.view(torch.int32) & keep.int().neg_()).view(torch.float32)


def expert_capacity(num_tokens: int, gate: GateConfig, capacity_factor: float) -> int:
    """C = ceil(gamma * T * k / E): tokens each expert may keep (T = local tokens)."""
    return math.ceil(capacity_factor * num_tokens * gate.topk / gate.num_experts)


_TOKEN_BITS = 21  # token index field of the sort key: up to 2**21 tokens per call
_PRIORITY_BITS = 32
_GROUP_SHIFT = _TOKEN_BITS + _PRIORITY_BITS  # 53: up to 2**10 - 1 groups in an int64


def _descending_u32(priority: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in [0, 2**32), smaller for larger values (IEEE bits made monotone)."""
    bits = priority.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    ascending = torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)
    return 0xFFFFFFFF - ascending


def keep_top_per_group(
    expert_idx: torch.Tensor, priority: torch.Tensor, group_size: int, capacity: int, num_experts: int
) -> torch.Tensor:
    """[T, m] bool: which candidate (token, expert) pairs to keep so that each group of
    ``group_size`` adjacent experts keeps its ``capacity`` pairs of highest ``priority``.

    expert_idx: [T, m] int64 candidate experts per token; priority: [T, m] float, -inf where the
    slot holds no candidate. Ties go to the earlier token, so no group keeps more than
    ``capacity`` pairs. One sort of the T * m unique keys (group, priority, token) and a rank
    within each group: no dense [T, E] pass, no host synchronisation.
    """
    groups = num_experts // group_size
    return _keep_top_in_groups(expert_idx // group_size, priority, groups, capacity)


def keep_top_per_expert_group(
    expert_idx: torch.Tensor,
    priority: torch.Tensor,
    expert_group: torch.Tensor,
    num_groups: int,
    capacity: torch.Tensor,
) -> torch.Tensor:
    """[T, m] bool: ``keep_top_per_group`` for any grouping of the experts.

    expert_idx, priority: as ``keep_top_per_group``; expert_group: [E] int64, the group of each
    expert, in [0, num_groups); capacity: [num_groups] int64, the pairs each group may keep.
    """
    return _keep_top_in_groups(expert_group[expert_idx], priority, num_groups, capacity)


def _keep_top_in_groups(
    group: torch.Tensor, priority: torch.Tensor, groups: int, capacity: int | torch.Tensor
) -> torch.Tensor:
    """[T, m] bool: in each of ``groups`` groups (group: [T, m] int64 group of each candidate),
    keep the ``capacity`` (an int, or [groups] int64 per group) candidates of highest priority."""
    T, m = group.shape
    _check_key_range(T, groups)
    valid = torch.isfinite(priority)
    group = torch.where(valid, group, torch.full_like(group, groups))
    key = _candidate_keys(group, priority).reshape(-1)
    # keys are unique (the token is in them): the sorted keys carry the group, no gather needed
    sorted_key, order = torch.sort(key)
    sorted_group = sorted_key >> _GROUP_SHIFT
    counts = torch.bincount(sorted_group, minlength=groups + 1)
    first = torch.cumsum(counts, dim=0) - counts
    rank = torch.arange(key.numel(), device=key.device) - first.gather(0, sorted_group)
    if isinstance(capacity, torch.Tensor):  # one capacity per group; the invalid group keeps 0
        capacity = torch.cat([capacity, capacity.new_zeros(1)]).gather(0, sorted_group)
    keep_sorted = (rank < capacity) & (sorted_group < groups)
    return torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted).view(T, m)


def _candidate_keys(group: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """[T, m] int64 sort keys (group, priority descending, token): unique, ascending = kept first."""
    token = torch.arange(group.shape[0], device=group.device, dtype=torch.int64).unsqueeze(1)
    return (group << _GROUP_SHIFT) | (_descending_u32(priority) << _TOKEN_BITS) | token


def _check_key_range(num_tokens: int, groups: int) -> None:
    if num_tokens >= 1 << _TOKEN_BITS or groups >= 1 << (63 - _GROUP_SHIFT):
        raise ValueError(
            f"capacity routing supports < {1 << _TOKEN_BITS} tokens and < "
            f"{1 << (63 - _GROUP_SHIFT)} expert groups per call, got {num_tokens} and {groups}"
        )


def keep_top_per_column(priority: torch.Tensor, capacity: int) -> torch.Tensor:
    """[T, n] bool: in each column of ``priority`` [T, n] (every token a candidate), the
    ``capacity`` entries of highest priority, ties to the earlier token (as ``keep_top_per_group``).

    One top-``capacity`` per column over unique integer keys: cheaper than sorting when every
    token competes, as for the rank-local experts of expanded drop.
    """
    T, n = priority.shape
    _check_key_range(T, 1)
    if capacity >= T:
        return torch.ones_like(priority, dtype=torch.bool)
    columns = priority.t().contiguous()  # [n, T]: keys built and ranked along each row
    token = torch.arange(T, device=priority.device, dtype=torch.int64)
    key = (_descending_u32(columns) << _TOKEN_BITS) | token
    top = torch.topk(key, capacity, dim=1, largest=False, sorted=False)[1]  # [n, C] tokens
    return torch.zeros(n, T, dtype=torch.bool, device=priority.device).scatter_(1, top, True).t()


def _priority(
    scores: torch.Tensor, expert_idx: torch.Tensor, valid: torch.Tensor, policy: str, seed: int
) -> torch.Tensor:
    """[T, m] float priority of the candidates ``expert_idx`` [T, m] for the drop policy
    (scores: [T, E]), -inf where ``valid`` is False."""
    T = scores.shape[0]
    if policy == "score":
        pri = torch.gather(scores, 1, expert_idx)
    elif policy in ("order", "reverse"):
        pos = torch.arange(T, device=scores.device, dtype=torch.float32)
        pri = (-pos if policy == "order" else pos).unsqueeze(1).expand(expert_idx.shape)
    else:  # random: one draw per (token, expert), whatever the candidate layout
        gen = torch.Generator(device=scores.device).manual_seed(seed)
        draws = torch.rand(scores.shape, generator=gen, device=scores.device)
        pri = torch.gather(draws, 1, expert_idx)
    return torch.where(valid, pri, torch.full_like(pri, float("-inf")))


def _vanilla(logits, gate, ctx, dist=None) -> tuple[torch.Tensor, Routing]:
    """Top-k indices [T, k] and the vanilla Routing built from them (Megatron's bits);
    ``dist``: the score distribution when the caller has it (see ``topk_indices``)."""
    idx = topk_indices(logits, gate, ctx, dist)
    return idx, _vanilla_routing(logits, gate, idx, dist)


def _vanilla_routing(logits, gate, idx, dist=None) -> Routing:
    """The vanilla Routing of top-k indices ``idx`` [T, k]."""
    probs, routing_map = routing_from_indices(
        idx, gate_weights(logits, idx, gate, dist), gate.num_experts, like=logits
    )
    zero = torch.zeros((), dtype=torch.int64, device=logits.device)
    return Routing(probs, routing_map, num_dropped=zero)


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

    Device scope groups the experts by ``ctx.expert_group`` when the context gives a layout (a
    group of n experts keeps ceil(n * gamma * T * k / E)), else contiguously (E / EP per rank).
    """
    ctx = ctx or RoutingContext()
    params = params or TokenDropParams()
    dist = score_distribution(logits, gate)  # computed once: ranking, selection and weights
    idx, base = _vanilla(logits, gate, ctx, dist)
    if params.prefill_only and ctx.decode:
        return base
    T, E = base.routing_map.shape
    capacity = expert_capacity(T, gate, params.capacity_factor)
    valid = torch.ones_like(idx, dtype=torch.bool)
    pri = _priority(dist, idx, valid, params.drop_policy, ctx.seed)
    if params.scope == "device" and ctx.expert_group is not None:
        group = ctx.expert_group.to(logits.device)
        size = torch.bincount(group, minlength=ctx.ep_size)
        # the contiguous formula, left to right in float64 (as Python's float), per group
        group_capacity = (size.double() * params.capacity_factor * T * gate.topk / E).ceil_().long()
        kept = keep_top_per_expert_group(idx, pri, group, ctx.ep_size, group_capacity)
    else:
        group = 1
        if params.scope == "device":
            group = E // ctx.ep_size
            group_capacity = math.ceil(group * params.capacity_factor * T * gate.topk / E)
        else:
            group_capacity = capacity
        kept = keep_top_per_group(idx, pri, group, group_capacity, E)
    keep = torch.zeros_like(base.routing_map).scatter_(1, idx, kept)
    probs = base.probs * keep  # (a float x bool product is the cheapest masking on CPU)
    if params.renormalize:
        before = base.probs.sum(dim=1, keepdim=True)
        after = probs.sum(dim=1, keepdim=True)
        probs = probs * torch.where(after > 0, before / after, torch.zeros_like(after))
    return Routing(
        probs,
        keep,
        capacity=capacity if params.scope == "expert" else None,
        num_dropped=(~kept).sum(),
    )


def expanded_drop(
    logits: torch.Tensor,
    gate: GateConfig,
    params: ExpandedDropParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """Capacity-aware expanded drop. logits [T, E] -> Routing (a token may get more than k).

    Candidates: each token's top-k plus every expert hosted on this EP rank: ``ctx.local_experts``
    (replicas included) when the context gives a layout, else the contiguous
    [rank * E/EP, (rank + 1) * E/EP). Each expert keeps its C best candidates by score
    S[t, e]; optionally each token then keeps at most ``max_experts_per_token``. Weights are the
    scores S of the kept experts, renormalised per token when ``renormalize``. With EP = 1 every
    expert is local: expert-choice routing with capacity C.
    """
    ctx = ctx or RoutingContext()
    params = params or ExpandedDropParams()
    scores = score_distribution(logits, gate)  # computed once: selection, ranking, weights
    idx = topk_indices(logits, gate, ctx, scores)
    if params.prefill_only and ctx.decode:
        return _vanilla_routing(logits, gate, idx, scores)
    T, E = logits.shape
    capacity = expert_capacity(T, gate, params.capacity_factor)
    local = None
    if ctx.local_experts is not None:
        local = ctx.local_experts.to(logits.device)
        remote = ~local[idx]
    else:
        per_rank = E // ctx.ep_size
        lo, hi = ctx.ep_rank * per_rank, (ctx.ep_rank + 1) * per_rank
        remote = (idx < lo) | (idx >= hi)
    # a remote expert's candidates are the tokens whose top-k holds it: token drop among those
    kept = keep_top_per_group(idx, _priority(scores, idx, remote, "score", ctx.seed), 1, capacity, E)
    keep = torch.zeros(T, E, dtype=torch.bool, device=logits.device).scatter_(1, idx, kept)
    # a local expert's candidates are all tokens
    if local is None:
        keep[:, lo:hi] = keep_top_per_column(scores[:, lo:hi], capacity)
    else:  # every column ranked, local ones taken: counting the local experts would sync
        keep = torch.where(local, keep_top_per_column(scores, capacity), keep)
    m = params.max_experts_per_token
    if m is not None and m < E:
        row_pri = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
        top = torch.topk(row_pri, m, dim=1, sorted=False)[1]
        keep = keep & torch.zeros_like(keep).scatter_(1, top, True)
    weights = _masked(scores, keep)
    if params.renormalize:
        total = weights.sum(dim=1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    if gate.scaling_factor:
        weights = weights * gate.scaling_factor
    return Routing(
        weights.to(logits.dtype),
        keep,
        capacity=capacity,
        num_dropped=(~torch.gather(keep, 1, idx)).sum(),
    )

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
``laser`` is the vectorised version: a few rounds of proposals against per-expert quotas.
The quota is the water level L: the smallest integer load at which the experts the pending
tokens can reach absorb all pending assignments. Each round every pending token proposes to its
best-scoring open candidates (load < L), each expert accepts proposals in token order up to its
quota, and L is recomputed for what is left. After ``rounds`` rounds, any remaining need goes to
the least-loaded remaining candidates. No Python loop over tokens, no host synchronisation.
"""

from __future__ import annotations

import torch

from ..config import GateConfig, LaserParams, RoutingContext
from ..routing import Routing, routing_from_indices
from .gate import gate_weights, score_distribution, select_topk, selection_scores

__all__ = ["laser", "laser_reference", "water_level", "laser_plan"]


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


def laser_plan(
    logits: torch.Tensor, gate: GateConfig, params: LaserParams, ctx: RoutingContext
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared first half of LASER (shape test, pools, starting loads).

    Returns (vanilla_idx [T, k], flexible [T] bool, pool_idx [T, c], valid [T, c] bool,
    base_load [E] float32 = expert_load + skewed tokens' vanilla choices).
    """
    k, E = gate.topk, gate.num_experts
    c = params.resolved_pool_size(gate)
    sel = selection_scores(logits, gate, ctx.expert_bias)
    vanilla_idx = select_topk(sel, gate, k)
    dist = score_distribution(logits, gate)

    if params.load_only:
        flexible = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        m = params.top_m if params.top_m is not None else k
        mass = torch.topk(dist, m, dim=1, sorted=False)[0].sum(dim=1)
        flexible = mass < params.eps_high

    if c == k:
        pool_idx = vanilla_idx  # same order as vanilla: c = k reproduces it bit for bit
    else:
        pool_idx = select_topk(sel, gate, c, sorted=True)
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
    return vanilla_idx, flexible, pool_idx, valid, base + fixed_counts


def _compact(chosen: torch.Tensor, pool_idx: torch.Tensor, k: int) -> torch.Tensor:
    """[T, k] pool entries marked in ``chosen`` [T, c] (exactly k per row), in pool order."""
    c = pool_idx.shape[1]
    order_key = chosen * torch.arange(c, 0, -1, device=chosen.device)
    pos = torch.topk(order_key, k, dim=1, sorted=True)[1]
    return torch.gather(pool_idx, 1, pos)


def _finish(logits, gate, vanilla_idx, flexible, chosen_idx) -> Routing:
    idx = torch.where(flexible.unsqueeze(1), chosen_idx, vanilla_idx)
    probs, routing_map = routing_from_indices(
        idx, gate_weights(logits, idx, gate), gate.num_experts, like=logits
    )
    return Routing(probs, routing_map, num_dropped=torch.zeros((), dtype=torch.int64, device=logits.device))


def laser(
    logits: torch.Tensor,
    gate: GateConfig,
    params: LaserParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """LASER routing, vectorised. logits [T, E] -> Routing with exactly k experts per token."""
    ctx = ctx or RoutingContext()
    params = (params or LaserParams()).for_layer(ctx.layer)
    k, E = gate.topk, gate.num_experts
    vanilla_idx, flexible, pool_idx, valid, load = laser_plan(logits, gate, params, ctx)
    T, c = pool_idx.shape
    if c == k or T == 0:
        return _finish(logits, gate, vanilla_idx, flexible, pool_idx)

    need = torch.where(flexible, k, 0)  # [T] assignments still to make
    chosen = torch.zeros_like(valid)
    expert_ids = pool_idx
    for _ in range(params.rounds):
        pending = need > 0
        wanted = (valid & ~chosen & pending.unsqueeze(1)).reshape(-1).int()
        reach = torch.zeros(E, dtype=torch.int32, device=logits.device).scatter_add_(
            0, expert_ids.reshape(-1), wanted
        ) > 0
        level = water_level(load, need.sum().float(), reach)
        open_ = valid & ~chosen & (load[expert_ids] < level)
        # propose to the best-scoring open candidates, as many as still needed
        propose = open_ & (torch.cumsum(open_.int(), dim=1) <= need.unsqueeze(1))
        proposals = torch.zeros(T, E, dtype=torch.int32, device=logits.device).scatter_(
            1, expert_ids, propose.int()
        )
        # each expert accepts in token order up to its quota (as the sequential greedy would)
        quota = (level - load).clamp(min=0)
        arrival = torch.cumsum(proposals, dim=0)
        accepted = (proposals > 0) & (arrival <= quota.unsqueeze(0))
        got = torch.gather(accepted, 1, expert_ids) & propose
        chosen |= got
        need = need - got.sum(dim=1)
        load = load + accepted.sum(dim=0).float()

    # leftovers: least-loaded remaining candidates (stable on score order for ties)
    left = valid & ~chosen
    cand_load = torch.where(left, load[expert_ids], torch.full_like(load[expert_ids], float("inf")))
    rank_key = cand_load * (c + 1) + torch.arange(c, device=logits.device)  # load first, then score order
    order = torch.argsort(rank_key, dim=1, stable=True)
    take_sorted = torch.arange(c, device=logits.device).unsqueeze(0) < need.unsqueeze(1)
    take = torch.zeros_like(chosen).scatter_(1, order, take_sorted)
    chosen |= take & left
    return _finish(logits, gate, vanilla_idx, flexible, _compact(chosen, pool_idx, k))


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
    vanilla_idx, flexible, pool_idx, valid, load = laser_plan(logits, gate, params, ctx)
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
    return _finish(logits, gate, vanilla_idx, flexible, chosen_idx)
